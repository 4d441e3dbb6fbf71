"use strict";
// The cluster page: reads /v2/nodes, /v2/catalog/models, /v2/placement/errors and /v2/certificates with a
// read credential and redraws its tables every few seconds.
//
// The credential lives in this tab's sessionStorage only (gone when the tab closes, never shared with other
// tabs or written to disk the way localStorage is) and travels as an Authorization header, never in a URL
// where history, logs and Referer headers would keep it. Everything the daemon says (node ids, addresses,
// free text from nodes) is put on the page as text nodes, never parsed as HTML.
(() => {
  const STORAGE_KEY = "llorch.read-credential";
  const REFRESH_MS = 3000;
  const REQUEST_TIMEOUT_MS = 5000;
  const MAX_ERROR_ROWS = 100; // the daemon keeps 100; a bigger answer is not drawn in full
  const NONE = "\u2014";
  const CREDENTIAL_RE = /^[\x21-\x7e]{1,4096}$/; // what an HTTP header can carry as a bearer token

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let lastGoodAt = null;

  class Refused extends Error {}

  const credential = () => sessionStorage.getItem(STORAGE_KEY);

  // One read route, as JSON; null when the route does not exist on this daemon (an older version).
  async function read(path) {
    const controller = new AbortController();
    const deadline = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const answer = await fetch(path, {
        headers: { Authorization: "Bearer " + credential(), Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        signal: controller.signal,
      });
      if (answer.status === 401) throw new Refused();
      if (answer.status === 404) return null;
      if (!answer.ok) throw new Error(path + " answered " + answer.status);
      return await answer.json();
    } finally {
      clearTimeout(deadline);
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined || text === "" ? NONE : String(text);
    if (className) td.className = className;
    return td;
  }

  function row(cells, data) {
    const tr = document.createElement("tr");
    for (const [name, value] of Object.entries(data || {})) tr.dataset[name] = value;
    tr.append(...cells);
    return tr;
  }

  function fill(table, rows) {
    $(table).tBodies[0].replaceChildren(...rows);
    $(table).hidden = rows.length === 0;
    $(table + "-empty").hidden = rows.length !== 0;
    const count = $(table + "-count");
    if (count) count.textContent = "(" + rows.length + ")";
  }

  function bytes(value) {
    if (typeof value !== "number") return NONE;
    const gib = value / 1024 ** 3;
    return gib >= 1 ? gib.toFixed(1) + " GiB" : (value / 1024 ** 2).toFixed(0) + " MiB";
  }

  function ago(timestamp) {
    if (!timestamp) return "never";
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(timestamp)) / 1000));
    return Number.isFinite(seconds) ? timestamp + " (" + seconds + " s ago)" : timestamp;
  }

  const clock = (date) => date.toISOString().slice(11, 19) + " UTC";

  function drawNodes(nodes) {
    fill(
      "nodes",
      nodes.map((node) =>
        row(
          [
            cell(node.node_id, "id"),
            cell(node.address),
            cell(node.status, "status status-" + node.status),
            cell(node.drain ? "drained" : "no"),
            cell(ago(node.last_heartbeat_at)),
            cell(node.version),
          ],
          { nodeId: node.node_id, status: node.status },
        ),
      ),
    );
  }

  function drawPools(nodes) {
    const rows = [];
    for (const node of nodes) {
      for (const pool of node.pools || []) {
        const engine = pool.engine;
        const ready = pool.draining ? "draining" : pool.ready ? "yes" : "no";
        // Before its first heartbeat a node has said nothing about its slots or memory.
        const reported = Boolean(node.last_heartbeat_at);
        const slots = pool.slots_total - pool.slots_free + " / " + pool.slots_total;
        const vram = bytes(pool.vram_total_bytes - pool.vram_free_bytes) + " / " + bytes(pool.vram_total_bytes);
        const tr = row(
          [
            cell(node.node_id + " / " + pool.pool_id, "id"),
            cell(engine ? engine.kind : "none"),
            cell(engine ? engine.state : NONE, engine ? "state-" + engine.state : ""),
            cell(engine ? engine.model_id : NONE),
            cell(ready),
            cell(reported ? slots : NONE),
            cell(reported ? vram : NONE),
          ],
          { pool: node.node_id + "/" + pool.pool_id, nodeStatus: node.status },
        );
        // An offline node's readings are as old as its last heartbeat: shown, but greyed.
        if (node.status === "offline" || !reported) tr.className = "stale";
        rows.push(tr);
      }
    }
    fill("pools", rows);
  }

  function drawModels(models) {
    fill(
      "models",
      models.map((model) => {
        const engines = model.engines || [];
        const where = (engine) => engine.node_id + "/" + engine.pool_id;
        const served = engines.filter((engine) => engine.serving).map(where);
        const waiting = engines.filter((engine) => !engine.serving).map((e) => where(e) + " (" + e.state + ")");
        return row(
          [
            cell(model.model_id, "id"),
            cell(served.concat(waiting).join(", ")),
            cell((model.nodes || []).join(", ")),
            cell(model.replicas),
            cell(model.slots_free),
          ],
          { model: model.model_id },
        );
      }),
    );
  }

  function drawErrors(answer) {
    const errors = answer && Array.isArray(answer.errors) ? answer.errors.slice(0, MAX_ERROR_ROWS) : [];
    fill(
      "errors",
      errors.map((error) =>
        row([cell(error.at), cell(error.source), cell(error.model_id), cell(error.code), cell(error.message)]),
      ),
    );
  }

  // The days left on the certificate this daemon serves and on the cluster CA. Whether a row warns is the
  // daemon's call (warn_days, the threshold status.yml uses too), not a second copy of it here.
  const CERTIFICATE_NAMES = { server: "server certificate (this daemon)", ca: "cluster CA" };

  function drawCertificates(answer) {
    const certificates = answer && Array.isArray(answer.certificates) ? answer.certificates.slice(0, 10) : [];
    fill(
      "certificates",
      certificates.map((item) => {
        const days = item.warn
          ? item.days_left + " (fewer than " + answer.warn_days + ": renew)"
          : String(item.days_left);
        const tr = row(
          [
            cell(CERTIFICATE_NAMES[item.certificate] || item.certificate),
            cell(days, item.warn ? "days-warn" : ""),
            cell(item.not_after),
          ],
          { certificate: item.certificate, warn: item.warn ? "yes" : "no" },
        );
        if (item.warn) tr.className = "warn";
        return tr;
      }),
    );
    // An older daemon without the route says nothing about its certificates: not "plain HTTP".
    $("certificates-empty").textContent = answer
      ? "No certificate: this daemon serves plain HTTP."
      : "This daemon does not report its certificates.";
  }

  function sayFreshness(state, text) {
    const freshness = $("freshness");
    freshness.textContent = text;
    freshness.dataset.state = state;
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    timer = null;
    if (!credential()) return askForCredential("");
    try {
      const [nodes, models, errors, certificates] = await Promise.all([
        read("/v2/nodes"),
        read("/v2/catalog/models"),
        read("/v2/placement/errors"),
        read("/v2/certificates"),
      ]);
      if (!credential()) return; // forgotten while the answers were on their way
      if (!nodes || !models) throw new Error("this daemon lacks /v2/nodes or /v2/catalog/models");
      drawNodes(nodes.nodes || []);
      drawPools(nodes.nodes || []);
      drawModels(models.models || []);
      drawErrors(errors);
      drawCertificates(certificates);
      lastGoodAt = new Date();
      sayFreshness("ok", "updated " + clock(lastGoodAt) + ", every " + REFRESH_MS / 1000 + " s");
    } catch (problem) {
      if (problem instanceof Refused) {
        return forget("The daemon refused that credential (401). Enter it again.");
      }
      const since = lastGoodAt ? "; the tables show what it said at " + clock(lastGoodAt) : "";
      sayFreshness("unreachable", "daemon unreachable at " + clock(new Date()) + since);
    }
    schedule();
  }

  function askForCredential(problem) {
    $("cluster").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-problem").textContent = problem;
    $("login-problem").hidden = !problem;
    sayFreshness("signed-out", "not connected");
    $("credential").focus();
  }

  // Drop the credential and everything read with it, then ask again.
  function forget(problem) {
    clearTimeout(timer);
    timer = null;
    sessionStorage.removeItem(STORAGE_KEY);
    lastGoodAt = null;
    for (const table of ["nodes", "pools", "models", "errors", "certificates"]) fill(table, []);
    askForCredential(problem);
  }

  function start(event) {
    event.preventDefault(); // never let the browser submit the form: the field would end up in a URL
    const field = $("credential");
    const value = field.value.trim();
    field.value = "";
    if (!CREDENTIAL_RE.test(value)) {
      return askForCredential("A credential is printable ASCII without spaces.");
    }
    sessionStorage.setItem(STORAGE_KEY, value);
    $("login").hidden = true;
    $("cluster").hidden = false;
    $("forget").hidden = false;
    sayFreshness("loading", "loading\u2026");
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", start);
    $("forget").addEventListener("click", () => forget(""));
    if (credential()) {
      $("cluster").hidden = false;
      $("forget").hidden = false;
      refresh();
    } else {
      askForCredential("");
    }
  });
})();
