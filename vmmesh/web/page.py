"""``GET /``: the mesh on one page, with its style and script inline, and nothing else.

No build step and nothing fetched from anywhere but this node (a LAN may
have no internet): the HTML is a fixed shell, the same bytes for everyone,
and holds no data at all.  The script opens ``/events`` (server-sent
events) and draws every snapshot it gets into the shell with DOM calls,
each value from gossip (host names, VM names, reasons) set as text
(``append``/``textContent``, never ``innerHTML``), so a value cannot become
markup.  The Content-Security-Policy allows only this script and this style
(by their hashes) and connections to this origin, so even a mistake in the
script could not run injected code or send data elsewhere.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2d3d;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}
#live{margin-left:auto;font-size:12px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:12px;padding:12px}
.wide{grid-column:1/-1}
section{background:#fff;border:1px solid #d8dce2;border-radius:4px;padding:8px 12px;overflow:auto}
h2{font-size:15px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eee;white-space:nowrap}
th{font-weight:600;color:#555}
#events td:last-child{white-space:normal}
.bar{position:relative;width:120px;height:14px;background:#e3e6ea;border-radius:3px;overflow:hidden}
.bar div{height:100%;background:#4a90d9;border-radius:3px}
.bar span{position:absolute;left:4px;top:0;font-size:11px;line-height:14px;white-space:nowrap}
.bar.long{width:220px}
.st{padding:1px 6px;border-radius:3px;font-size:12px;color:#fff;background:#888}
.up{background:#2e8b57}.suspect{background:#d98e04}.down{background:#c0392b}.joining{background:#5b7fa6}
.draining{background:#7d5ba6}.running{background:#2e8b57}
.dim{color:#888}.warm{color:#d35400}.grid td{text-align:center}
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
// Every value goes in as text: append() of a string makes a text node.
function el(tag, cls, ...kids) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  e.append(...kids.map((k) => (k instanceof Node ? k : String(k))));
  return e;
}
function row(...cells) { return el("tr", "", ...cells.map((c) => el("td", "", c))); }
function bar(used, total, label) {
  const b = el("div", "bar"), fill = el("div", "");
  fill.style.width = (total > 0 ? Math.min(100, (100 * used) / total) : 0) + "%";
  b.append(fill, el("span", "", label));
  return b;
}
function badge(state) { return el("span", "st " + state.replace(/[^a-z]/g, ""), state); }
function ago(now, t) { return t ? Math.max(0, Math.round(now - t)) + " s ago" : ""; }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function state(h) { return h.status === "up" && h.draining ? "draining" : h.status; }
function gib(mb) { return (mb / 1024).toFixed(1); }
function size(b) {
  return b >= 2 ** 30 ? (b / 2 ** 30).toFixed(1) + " GiB"
    : b >= 2 ** 20 ? (b / 2 ** 20).toFixed(1) + " MiB" : (b / 1024).toFixed(1) + " KiB";
}
// Long work's progress: a bar when the end is known, else its phase alone.
function progress(p) {
  const bytes = p.total ? size(p.done) + "/" + size(p.total) : "";
  const rate = p.rate ? ", " + size(p.rate) + "/s" : "";
  const pct = p.fraction === null ? "" : Math.round(100 * p.fraction) + "% ";
  const b = bar(p.fraction === null ? 0 : p.fraction, 1, pct + (bytes || p.phase) + rate);
  b.className = "bar long";
  return b;
}

function hosts(s) {
  s.hosts.hosts.sort((a, b) => a.name.localeCompare(b.name));  // templates() keeps this order
  $("hosts").replaceChildren(...s.hosts.hosts.map((h) => {
    const c = h.capacity, slots = c.running_vms + c.free_slots;
    const used = c.storage_quota_mb - c.storage_free_mb;
    return row(el("b", "", h.name), badge(state(h)), h.address,
      el("div", "", bar(c.running_vms, slots, c.running_vms + "/" + slots + " slots"),
        c.blocked ? el("span", "dim", c.blocked) : ""),  // why it offers none
      bar(used, c.storage_quota_mb, gib(used) + "/" + gib(c.storage_quota_mb) + " GiB"),
      c.cores + " cores, " + gib(c.memory_mb) + " GiB", h.vms.length,
      h.this_host ? "this host" : ago(s.now, h.last_heard));
  }));
}
function vms(s) {
  const byHost = (a, b) => a.host.localeCompare(b.host) || a.name.localeCompare(b.name);
  const rows = [...s.vms.vms].sort(byHost);
  const use = new Map((s.usage || []).map((u) => [u.vm, u]));  // this host's VMs only
  $("vms").replaceChildren(...rows.map((v) => {
    const l = v.lineage, start = v.start === "warm" ? el("span", "warm", "warm") : v.start;
    const gen = l.keep_alive ? "keep-alive, gen " + l.generation
      : l.generation > 1 ? "gen " + l.generation : "";
    const u = v.node_id === s.status.node_id ? use.get(v.name) : undefined;
    const figures = u ? u.cpu_seconds.toFixed(1) + " s CPU, " + size(u.rss_bytes) + ", disk "
      + size(u.read_bytes) + " read, " + size(u.written_bytes) + " written" : "";
    return row(v.host, el("b", "", v.name), badge(v.state),
      el("span", "", start, " " + v.start_seconds.toFixed(1) + " s"), gen, l.origin,
      v.stop_reason, el("span", "dim", figures));
  }));
  $("vmerrors").replaceChildren(...s.vms.errors.map((e) => el("li", "", e)));
}
function templates(s) {
  const held = new Map();  // template id -> its packages and who holds it (warm or not)
  for (const h of s.hosts.hosts) for (const t of h.templates) {
    if (!held.has(t.template_id)) held.set(t.template_id, {packages: t.packages, on: new Map()});
    held.get(t.template_id).on.set(h.node_id, t.warm);
  }
  const cols = s.hosts.hosts;
  const head = cols.map((h) => el("th", "", h.name));
  $("tplhead").replaceChildren(el("tr", "", el("th", "", "template"), ...head));
  const cell = (t, h) => !t.on.has(h.node_id) ? ""
    : t.on.get(h.node_id) ? el("span", "warm", "warm") : "held";
  $("templates").replaceChildren(...[...held.entries()].map(([id, t]) => {
    const name = t.packages.length ? [...t.packages].sort().join(" ") : "base";
    const label = el("td", "", el("span", "", name), " ", el("span", "dim", id.slice(0, 8)));
    return el("tr", "", label, ...cols.map((h) => el("td", "", cell(t, h))));
  }));
}
// Every host's work under way as it gossips it (key work: rounded, at most every 2 s).
function work(s) {
  const all = [];
  for (const h of s.hosts.hosts) for (const w of h.work || []) all.push([h.name, w]);
  const of = (kind) => all.filter(([, w]) => w.kind === kind);
  const transfers = of("fetch").map(([host, w]) =>
    row(host, el("b", "", w.name), progress(w), w.note));
  const moves = of("migration").map(([host, w]) =>
    row(host, el("b", "", w.name), progress(w), w.peer ? "to " + w.peer : "", w.phase));
  $("transfers").replaceChildren(...transfers);
  $("migrating").replaceChildren(...moves);
  $("nowork").textContent = transfers.length || moves.length ? ""
    : "no transfer or migration under way in the mesh";
  const jobs = of("job").map(([host, j]) => {
    const label = j.done + " of " + j.total + " done";
    return row(host, el("b", "", j.name), badge(j.phase), j.vms, bar(j.done, j.total, label),
      (j.done - j.failed) + " ok, " + j.failed + " failed or lost", ago(s.now, j.started));
  });
  $("jobs").replaceChildren(...jobs);
  $("nojobs").textContent = jobs.length ? "" : "no job open in the mesh";
}
// The extensions' figures, from the status reply: what vmmesh status and /metrics show.
function figures(s) {
  const figs = s.status.figures || [];
  const moves = (r) => figs.filter((f) => f.name === "migrations" && f.labels.result === r)
    .reduce((n, f) => n + f.value, 0);
  $("migrations").textContent = figs.some((f) => f.name === "migrations")
    ? moves("done") + " done, " + moves("failed") + " failed (from this host)"
    : "no migrations here";
  const value = (f) => f.unit === "bytes" ? size(f.value)
    : f.value + (f.unit === "seconds" ? " s" : "");
  $("figures").replaceChildren(...figs.map((f) => row(f.name.replace(/_/g, " "),
    Object.keys(f.labels).sort().map((k) => f.labels[k]).join(" "), value(f))));
}
function events(s) {
  const bad = (kind) => kind === "down" || kind === "suspect" || kind.endsWith("refused");
  $("events").replaceChildren(...s.events.slice().reverse().map((e) =>
    row(clock(e.at), el("span", "st " + (bad(e.kind) ? "down" : "up"), e.kind), e.text)));
}
function draw(s) {
  $("mesh").textContent = "mesh " + s.status.mesh_id.slice(0, 12) + ", seen from " + s.status.name;
  for (const part of [hosts, vms, templates, work, figures, events]) part(s);
  $("live").textContent = "live, " + clock(s.now);
}
const source = new EventSource("/events");
source.onmessage = (m) => draw(JSON.parse(m.data));
source.onerror = () => {
  $("live").textContent = "disconnected: retrying (or log in again: vmmesh web)";
};
"""

BODY = """<header><h1>vmmesh</h1><span id="mesh"></span><span id="live">connecting</span></header>
<main>
<section class="wide"><h2>Hosts</h2><table><thead><tr><th>host</th><th>status</th><th>address</th>
<th>VM slots</th><th>storage</th><th>size</th><th>VMs</th><th>heard</th></tr></thead>
<tbody id="hosts"></tbody></table></section>
<section class="wide"><h2>VMs</h2><table><thead><tr><th>host</th><th>VM</th><th>state</th>
<th>start</th><th>keep-alive</th><th>origin</th><th>stop reason</th><th>use</th></tr></thead>
<tbody id="vms"></tbody></table>
<ul id="vmerrors"></ul></section>
<section class="wide"><h2>Transfers and migrations</h2><table>
<tbody id="transfers"></tbody><tbody id="migrating"></tbody></table><p id="nowork" class="dim"></p>
<h2>Jobs and bags</h2><table><thead><tr><th>host</th><th>job</th><th>state</th>
<th>VMs</th><th>commands</th><th>results</th><th>opened</th></tr></thead>
<tbody id="jobs"></tbody></table><p id="nojobs" class="dim"></p></section>
<section><h2>Templates</h2><table class="grid"><thead id="tplhead"></thead>
<tbody id="templates"></tbody></table></section>
<section><h2>Migrations</h2><p id="migrations"></p>
<h2>This host's figures</h2><table><tbody id="figures"></tbody></table>
<h2>Events</h2><table><tbody id="events"></tbody></table></section>
</main>
<p class="dim">&nbsp; also: <a href="/api/v1/status">/api/v1/status</a>
<a href="/api/v1/hosts">/api/v1/hosts</a> <a href="/api/v1/vms">/api/v1/vms</a>
<a href="/metrics">/metrics</a> <a href="/sd">/sd</a></p>"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


INDEX = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>vmmesh</title>'
    '<meta name="viewport" content="width=device-width">'
    f"<style>{STYLE}</style></head>\n<body>\n{BODY}\n<script>{SCRIPT}</script>\n</body></html>\n"
).encode()

CSP = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
