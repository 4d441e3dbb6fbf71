#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# ruff: noqa: E402 - Ansible modules keep DOCUMENTATION, EXAMPLES and RETURN above the imports

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_stage
short_description: Stage a model file into the node's models directory, verified and atomic
description:
  - Downloads a model file from an C(http://) or C(https://) URL, or copies a file that is already on
    the node, into O(models_dir) and records it in C(<models_dir>/manifest.json), the file the node agent
    (pool-managerd) reads to report the models it holds.
  - A model whose manifest entry has the same sha256 and whose file still has the recorded size and
    modification time is already staged; the module then reports C(changed=false) without reading the file.
  - Otherwise it checks free space first (counting the bytes a partial file already holds), writes into
    C(<dest>.partial) beside the target, resumes an interrupted download with an HTTP C(Range) request,
    computes sha256 while streaming (reading, hashing and writing overlap in three threads), fsyncs, renames
    atomically into place and updates the manifest atomically under a file lock, so parallel tasks keep each
    other's entries.
  - Every file in O(models_dir) is opened relative to the folder, following no symbolic link, and a file
    with more than one hard link is refused, so a link planted there never makes the module (root) write,
    read or create another file. The manifest lock is taken on the folder itself.
  - A source that sends more than O(size_bytes) (or its own C(Content-Length)) is stopped and its partial
    file deleted; a source that announces no length needs O(size_bytes). O(total_timeout) bounds the whole
    download.
  - Redirects are followed, at most 10 in a row (relative C(Location)s resolved, a resume's C(Range) sent
    again). O(headers) and credentials in the URL go only to the origin (scheme, host and port) of
    O(source). Once a redirect leaves it, as a model hub's download URL does for a CDN with a signed URL,
    no later request carries them. A redirect from C(https://) to C(http://) is refused.
  - A checksum mismatch deletes the partial file. An HTTP error or a dropped connection keeps it for the
    next run to resume. Partial files of other models older than O(partial_max_age_hours) are removed.
  - With O(state=absent) the model's file, its partial file and its manifest entry are removed.
version_added: "0.1.0"
author: [llorch-kit contributors (@llorch-kit)]
options:
  id:
    description:
      - Model id, as the registry reports it, with an optional publisher prefix as on model hubs
        (C(meta-llama/Llama-3.1-8B-Instruct)). Letters, digits, C(.), C(_), C(:), C(/) and C(-); at most
        256 characters (the registry's own rule).
    type: str
    required: true
  state:
    description: V(present) stages the model; V(absent) removes its file, partial file and manifest entry.
    type: str
    choices: [present, absent]
    default: present
  source:
    description:
      - An C(http://) or C(https://) URL, or an absolute path to a file already on the node.
      - Credentials in the URL are used but never shown in messages; prefer O(headers) for tokens.
      - Credentials in the URL are sent only to this URL's scheme, host and port, not to a host a redirect
        names.
      - Required with O(state=present).
    type: str
  sha256:
    description: Expected sha256 of the file (64 hex digits). Required with O(state=present).
    type: str
  size_bytes:
    description:
      - Expected size in bytes. Used for the free-space check before anything is fetched, and checked
        against the size the server announces. Without it the server's C(Content-Length) is used.
    type: int
  models_dir:
    description: Directory that holds the model files and C(manifest.json). It must exist.
    type: path
    default: /var/lib/llorch/models
  dest:
    description:
      - File name inside O(models_dir). Defaults to the last component of O(source).
      - Must be a plain file name; two models cannot share one.
    type: str
  headers:
    description:
      - Extra HTTP request headers, for example C(Authorization) for a model hub. Never logged.
      - Sent only to the scheme, host and port of O(source); a redirect to another origin gets none of them
        (every one may carry a secret), so a hub's redirect to a CDN with a signed URL works without them.
    type: dict
    default: {}
  validate_certs:
    description: Verify the server's TLS certificate.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the server to connect or to send the next bytes.
    type: int
    default: 60
  total_timeout:
    description:
      - Seconds the whole download may take, redirects included, however steadily the server sends; a
        source that trickles a byte at a time never trips O(timeout). The partial file stays for a resume.
      - V(0) turns the limit off.
    type: int
    default: 43200
  allow_link_local_redirects:
    description:
      - Follow a redirect to a host that resolves to a link-local address (C(169.254.0.0/16), C(fe80::/10)),
        where cloud metadata services answer. Refused by default; O(source) itself is not checked.
    type: bool
    default: false
  force:
    description: Fetch and verify the file again even when it is already staged; discards a partial file.
    type: bool
    default: false
  partial_max_age_hours:
    description:
      - Partial files of other models in O(models_dir) that were last written longer ago than this are
        removed. V(0) turns the clean-up off. The partial file of this model is always kept for the resume.
    type: float
    default: 24
notes:
  - Supports check mode; it reports what would be fetched or removed and touches nothing.
  - Staged files and the manifest are written with mode 0644, so the agent's user can read them when it owns
    or can read O(models_dir).
attributes:
  check_mode:
    description: Reports what would be fetched or removed and touches nothing.
    support: full
  diff_mode:
    description: No diff is returned.
    support: none
"""

EXAMPLES = r"""
- name: Stage a model from a mirror
  model_stage:
    id: llama-3-8b-instruct
    source: https://mirror.example.com/models/llama-3-8b-instruct.Q4_K_M.gguf
    sha256: 0b6f1c5bb2bd0c5e25d2f8e2f3d1a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4
    size_bytes: 4920734016
    models_dir: /var/lib/llorch/models

- name: Stage from a model hub with a token
  model_stage:
    id: mistral-7b
    source: https://huggingface.co/org/repo/resolve/main/model.gguf
    dest: mistral-7b.gguf
    sha256: "{{ mistral_sha256 }}"
    headers:
      Authorization: "Bearer {{ hub_token }}"
  no_log: false

- name: Remove a model that left the list
  model_stage:
    id: old-model
    state: absent
"""

RETURN = r"""
path:
  description: Final path of the model file.
  returned: always
  type: str
  sample: /var/lib/llorch/models/tiny-llama.gguf
sha256:
  description: sha256 of the staged file.
  returned: when state=present
  type: str
size_bytes:
  description: Size of the staged file in bytes.
  returned: when state=present
  type: int
bytes_downloaded:
  description: Bytes fetched (or copied) by this run; 0 when the model was already staged.
  returned: when state=present
  type: int
resumed_from:
  description: Offset at which an interrupted download was resumed; 0 when it started from the beginning.
  returned: when state=present
  type: int
seconds:
  description: Wall-clock seconds spent fetching, hashing and writing.
  returned: when state=present
  type: float
mb_per_s:
  description: Transfer rate of this run in MB (10^6 bytes) per second.
  returned: when state=present
  type: float
source:
  description:
    - O(source) without credentials and with its query string shown as C(?...) (a signed URL's signature
      lives there). In the echoed C(invocation), the password and query string of O(source) are masked.
  returned: always
  type: str
  sample: https://cdn.example.com/models/tiny.gguf?...
removed_partials:
  description: Partial files removed because they were stale (or, with state=absent, belonged to the model).
  returned: always
  type: list
  elements: str
manifest:
  description: Path of the manifest file.
  returned: always
  type: str
"""

from ansible_collections.llorch.kit.plugins.module_utils.llorch_staging import (
    StageError,
    Stager,
    StagingModule,
    source_secrets,
)


def main() -> None:
    module = StagingModule(
        argument_spec={
            "id": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "source": {"type": "str"},
            "sha256": {"type": "str"},
            "size_bytes": {"type": "int"},
            "models_dir": {"type": "path", "default": "/var/lib/llorch/models"},
            "dest": {"type": "str"},
            "headers": {"type": "dict", "default": {}, "no_log": True},
            "validate_certs": {"type": "bool", "default": True},
            "timeout": {"type": "int", "default": 60},
            "total_timeout": {"type": "int", "default": 43200},
            "allow_link_local_redirects": {"type": "bool", "default": False},
            "force": {"type": "bool", "default": False},
            "partial_max_age_hours": {"type": "float", "default": 24},
        },
        required_if=[("state", "present", ("source", "sha256"))],
        supports_check_mode=True,
    )
    # Masked in every result, the echoed arguments included (also when _log_invocation was not called).
    module.no_log_values.update(source_secrets(module.params["source"]))
    stager = Stager(module)
    failure = None
    try:
        stager.validate()
        result = stager.remove() if module.params["state"] == "absent" else stager.stage()
    except StageError as exc:
        failure = str(exc)
    except OSError as exc:
        where = exc.filename or stager.models_dir
        failure = f"staging model {stager.model_id} failed at {where}: {exc.strerror or exc}"
    finally:
        stager.close()
    if failure is not None:
        # Outside the except block: an expected failure is one message, not an exception with a traceback.
        module.fail_json(msg=failure, **stager.result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
