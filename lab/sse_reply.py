"""Print what a streamed chat completion said: reads curl's output (Server-Sent Events) on stdin.

`make lab` pipes the controller's /v1/chat/completions answer through it. Prints the reply text, the chunk
count and when the first token came; an error event, or a body that is not a stream (an OpenAI-shaped error
from the gateway), is printed as it came and ends the run with exit 1. Reads at most MAX_LINES lines of at
most MAX_LINE_BYTES each: the lab's answer is 16 tokens.
"""

from __future__ import annotations

import json
import sys
import time

MAX_LINES = 10_000
MAX_LINE_BYTES = 64 * 1024


def main(started: float) -> int:
    text: list[str] = []
    chunks = 0
    first_token_s: float | None = None
    done = False
    other: list[str] = []
    for count, raw in enumerate(sys.stdin.buffer, start=1):
        if count > MAX_LINES or len(raw) > MAX_LINE_BYTES:
            print(f"the stream went past {MAX_LINES} lines or {MAX_LINE_BYTES} bytes a line; stopped reading")
            return 1
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.startswith("data:"):
            if line.strip():
                other.append(line)
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except ValueError:
            other.append(line)
            continue
        if "error" in event:
            print("the stream ended with an error event: " + json.dumps(event["error"]))
            return 1
        chunks += 1
        for choice in event.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece and first_token_s is None:
                first_token_s = time.time() - started
            text.append(piece)
    if other and not chunks:
        print("no stream came back; the answer was: " + " ".join(other)[:2000])
        return 1
    if not done:
        print(f"the stream ended after {chunks} chunks without [DONE]")
        return 1
    first = f"{first_token_s * 1000:.0f} ms" if first_token_s is not None else "never"
    print(f"streamed {chunks} chunks; first token after {first}:")
    print("  " + json.dumps("".join(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else time.time()))
