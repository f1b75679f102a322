// The SPD web console: plain JS over the server's public HTTP API (no framework, no build step).
// Every API call sends `Authorization: Bearer <key>` when the user gave a key.
"use strict";

const API = new URL("..", location.href);  // the server root (the page is served at <root>/ui/)
const KEY_ITEM = "spd.apiKey";
const S = { key: null, model: null, modes: [], jobs: new Map(), cancelling: new Set(), poll: null, running: [] };

// ------------------------------------------------------------------ small DOM helpers

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

function el(tag, props = {}, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === "class") n.className = v;
    else if (k === "text") n.textContent = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? "" : v);
  }
  n.append(...kids.flat().filter((x) => x != null));
  return n;
}

function svg(tag, attrs = {}, ...kids) {
  const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  n.append(...kids.flat().filter((x) => x != null));
  return n;
}

function say(node, text, ok = false) {
  node.textContent = text || "";
  node.classList.toggle("error", !ok && !!text);
  node.classList.toggle("ok", ok);
}

const fmtTime = (s) => (s == null ? "" : s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);

// ------------------------------------------------------------------ the API

class APIError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  if (S.key) headers.set("Authorization", `Bearer ${S.key}`);
  let res;
  try {
    res = await fetch(new URL(path, API), { ...opts, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new APIError(0, `the server cannot be reached (${e.message})`);
  }
  if (res.ok) return res;
  let message = `${res.status} ${res.statusText}`, param = null;
  try {
    const body = await res.json();
    const err = body.error ?? body.detail;
    if (typeof err === "string") message = err;
    else if (err && err.message) ({ message, param } = err);
    else if (err) message = JSON.stringify(err);
  } catch { /* not JSON: keep the status line */ }
  if (res.status === 401) {
    message = S.key ? "The server refused this API key (401 Unauthorized). Check the key and enter it again."
                    : "This server needs an API key (401 Unauthorized): enter it to connect.";
    unauthorized(message);
  }
  throw new APIError(res.status, message, param);
}

const getJSON = async (path) => (await api(path)).json();
const sendJSON = async (path, method, body) =>
  (await api(path, { method, headers: { "content-type": "application/json" }, body: JSON.stringify(body) })).json();

// ------------------------------------------------------------------ connecting (the key is asked once)

function unauthorized(message) {
  clearInterval(S.poll);
  S.poll = null;
  $("#tabs").hidden = true;
  $$(".tab").forEach((t) => (t.hidden = true));
  $("#auth").hidden = false;
  $("#forget-key").hidden = true;
  say($("#auth-msg"), message);
  $("#auth-key").focus();
}

// Form bounds, defaults and name patterns come from the server's OpenAPI schema (spd_engine.config
// declares each once): an input with data-schema="Model.field" takes that field's.
async function applySchema() {
  let schemas;
  try {
    schemas = (await getJSON("openapi.json")).components.schemas;
  } catch {
    return;  // the server checks every field anyway
  }
  for (const input of $$("[data-schema]")) {
    const [model, field] = input.dataset.schema.split(".");
    const prop = schemas[model]?.properties?.[field];
    if (!prop) continue;
    const p = (prop.anyOf || []).find((b) => b.type !== "null") || prop;
    if (p.pattern) input.pattern = p.pattern.replace(/^\^|\$$/g, "").replace(/-\]/g, "\\-]");  // HTML's v-flag classes escape "-"
    if (p.maxLength !== undefined) input.maxLength = p.maxLength;
    for (const [attr, key] of [["min", "minimum"], ["max", "maximum"]]) if (p[key] !== undefined) input[attr] = p[key];
    if (prop.default !== undefined && prop.default !== null && input.value === "") input.value = prop.default;
    if (prop.description || p.description) input.title = prop.description || p.description;
  }
}

async function connect(key) {
  S.key = key || null;
  let models;
  try {
    models = await getJSON("v1/models");
  } catch (e) {
    if (e.status !== 401) unauthorized(`Cannot connect: ${e.message}`);
    return;
  }
  localStorage.setItem(KEY_ITEM, key || "");
  say($("#auth-msg"), "");
  $("#auth").hidden = true;
  $("#tabs").hidden = false;
  $("#forget-key").hidden = !S.key;
  showModels(models.data);
  showTab(location.hash.slice(1) || "playground");
  await Promise.all([applySchema(), refreshModes(), refreshJobs(), refreshAdapters()]);
  S.poll = setInterval(refreshJobs, 1000);
}

function showModels(data) {
  const sel = $("#play-model");
  const prev = sel.value;
  sel.replaceChildren(...data.map((m) => el("option", { value: m.id, text: m.parent ? `${m.id} (adapter)` : m.id })));
  if (data.some((m) => m.id === prev)) sel.value = prev;
  S.model = data.find((m) => !m.parent)?.id ?? data[0]?.id;
  $("#server-info").textContent = `model ${S.model}`;
}

function showTab(name) {
  if (!$(`#tab-${name}`)) name = "playground";
  $$(".tab").forEach((t) => (t.hidden = t.id !== `tab-${name}`));
  $$("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  history.replaceState(null, "", `#${name}`);
}

// ------------------------------------------------------------------ playground

function columnsWanted() {
  const strengths = $("#play-strengths").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!strengths.length || strengths.some((s) => !(s >= 0 && s <= 1))) throw new Error("strengths: numbers in [0, 1], comma-separated");
  const modes = $$("#play-modes input:checked").map((c) => c.value);
  return [{ title: "no mode" }, ...modes.flatMap((m) => strengths.map((s) => ({ title: `${m} @ ${s}`, capability: m, strength: s })))];
}

async function runPlayground(ev) {
  ev.preventDefault();
  stopPlayground();
  const msg = $("#play-msg");
  say(msg, "");
  let cols;
  try {
    cols = columnsWanted();
  } catch (e) {
    return say(msg, e.message);
  }
  const chat = $("input[name=play-kind]:checked").value === "chat";
  const prompt = $("#play-prompt").value;
  const base = {
    model: $("#play-model").value || S.model, max_tokens: Number($("#play-max").value), temperature: Number($("#play-temp").value),
    stream: true, stream_options: { include_usage: true },
    ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
  };
  const box = $("#play-columns");
  box.replaceChildren();
  $("#play-stop").disabled = false;
  const runs = cols.map((c) => {
    const out = el("pre", { class: "out" });
    const foot = el("div", { class: "foot muted", text: "waiting…" });
    const col = el("div", { class: "column", "data-state": "running", "data-chunks": "0" },
      el("div", { class: "head", text: c.title }), out, foot);
    box.append(col);
    const body = c.capability ? { ...base, capability: c.capability, capability_strength: c.strength } : base;
    const ctl = new AbortController();
    S.running.push(ctl);
    return stream(chat ? "v1/chat/completions" : "v1/completions", body, ctl.signal, col, out, foot);
  });
  await Promise.allSettled(runs);
  $("#play-stop").disabled = true;
}

function stopPlayground() {
  S.running.forEach((c) => c.abort());
  S.running = [];
}

// One column: vLLM's server-sent events, appended to the column as they arrive.
async function stream(path, body, signal, col, out, foot) {
  const t0 = performance.now();
  let usage = null;
  const finish = (state, text) => {
    col.dataset.state = state;
    foot.textContent = text;
    foot.classList.toggle("error", state === "error");
  };
  try {
    const res = await api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r/g, "");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new APIError(msg.error.code, msg.error.message);
          if (msg.usage) usage = msg.usage;
          const choice = msg.choices && msg.choices[0];
          const text = choice ? (choice.delta ? choice.delta.content : choice.text) : "";
          if (text) {
            out.textContent += text;
            col.dataset.chunks = String(Number(col.dataset.chunks) + 1);
            foot.textContent = `${fmtTime((performance.now() - t0) / 1000)}…`;
          }
        }
      }
    }
    const secs = (performance.now() - t0) / 1000;
    finish("done", usage ? `${usage.completion_tokens} tokens · ${fmtTime(secs)}` : fmtTime(secs));
  } catch (e) {
    finish(e.name === "AbortError" ? "stopped" : "error", e.name === "AbortError" ? "stopped" : e.message);
  }
}

// ------------------------------------------------------------------ modes

async function refreshModes() {
  const list = (await getJSON("v1/modes")).data;
  S.modes = list.filter((s) => s.loaded).map((s) => s.name);
  // the picker keeps what was checked
  const checked = new Set($$("#play-modes input:checked").map((c) => c.value));
  const picker = $("#play-modes");
  picker.replaceChildren(...S.modes.map((m) =>
    el("label", {}, el("input", { type: "checkbox", value: m, checked: checked.has(m) }), ` ${m}`)));
  if (!S.modes.length) picker.append(el("span", { class: "muted", text: "none loaded" }));

  $("#sub-table tbody").replaceChildren(...list.map(modeRow));
  if (!list.length) $("#sub-table tbody").append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no modes yet: upload a calibration file below" })));
  for (const id of ["#spec-pack", "#ang-a", "#ang-b"]) fillSelect($(id), list.filter((s) => s.valid).map((s) => s.name));
  if ($("#ang-b").options.length > 1 && $("#ang-b").selectedIndex === 0 && $("#ang-a").value === $("#ang-b").value) $("#ang-b").selectedIndex = 1;
  if ($("#spec-pack").value && $("#spec-pack").value !== S.shownPack) showSpectrum($("#spec-pack").value);
}

function fillSelect(sel, names) {
  const prev = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (names.includes(prev)) sel.value = prev;
}

function modeRow(s) {
  if (!s.valid) return el("tr", {}, el("td", { text: s.name }), el("td", { class: "error", colspan: 5, text: `invalid: ${s.error}` }));
  const ranks = Object.entries(s.ranks).map(([site, r]) => `${site}: ${r.join("/")}`).join(", ");
  return el("tr", { class: "clickable", onclick: () => { $("#spec-pack").value = s.name; showSpectrum(s.name); } },
    el("td", {}, el("b", { text: s.name })),
    el("td", { class: s.loaded ? "ok" : "muted", text: s.loaded ? "yes" : "no (other model)" }),
    el("td", { text: `${s.method}, ${s.task}, rank ${s.rank_rule}, ${s.granularity} granularity` }),
    el("td", { text: `${s.layers.join(", ")} · ${s.kinds.join("")}` }),
    el("td", { class: "small", text: ranks }),
    el("td", { class: "small", text: s.created.replace("T", " ").slice(0, 19) }));
}

async function showSpectrum(name) {
  S.shownPack = name;
  let pack;
  try {
    pack = await getJSON(`v1/modes/${encodeURIComponent(name)}`);
  } catch (e) {
    $("#spec-plot").replaceChildren(el("p", { class: "error", text: e.message }));
    return;
  }
  S.pack = pack;
  $("#spec-name").textContent = name;
  fillSelect($("#spec-site"), Object.keys(pack.spectrum));
  const m = pack.manifest, c = m.calibration;
  $("#spec-info").replaceChildren(...[
    ["method", `${m.method} (${m.task_kind}), rank rule ${m.rank_rule}, ${m.granularity} granularity`],
    ["calibration", `${c.data}: ${c.n_examples} examples, ${c.n_rows} rows, ${fmtTime(c.seconds)}`],
    ["data sha256", c.data_sha256.slice(0, 16) + "…"],
    ["model", `${m.model.identity.slice(0, 16)}…: ${m.model.n_layers} layers, ${m.model.n_kv_heads} KV heads × ${m.model.head_dim}`],
    ["created", `${m.created} (tool ${m.tool_version})`],
  ].flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  drawSpectrum();
}

// Energy per component (singular value squared over the total) as bars, the cumulative energy as
// a line, the pack's rank at this site as a dashed line.
function drawSpectrum() {
  const site = $("#spec-site").value, pack = S.pack;
  const box = $("#spec-plot");
  if (!pack || !site) return box.replaceChildren();
  const sv = pack.spectrum[site].singular_values;
  const energy = sv.map((s) => s * s), total = energy.reduce((a, b) => a + b, 0);
  const [layerKind, group] = [site.replace(/\.g\d+$/, ""), Number(site.split(".g").pop())];
  const rank = (pack.manifest.ranks[layerKind] || [])[group];
  if (!total) return box.replaceChildren(el("p", { class: "muted", text: `no spectrum at ${site} (a ${pack.manifest.method} subspace has none); rank ${rank}` }));
  // the head of the spectrum is what matters: the first max(4 x rank, 32) components are drawn
  const all = energy.map((e) => e / total);
  let acc = 0;
  const cumAll = all.map((f) => (acc += f));
  const shown = Math.min(all.length, Math.max(4 * (rank || 0), 32));
  const frac = all.slice(0, shown), cum = cumAll.slice(0, shown);
  const W = 560, H = 220, L = 44, R = 40, T = 10, B = 30, n = frac.length, w = (W - L - R) / n;
  const top = Math.max(...frac);
  const y = (v) => T + (H - T - B) * (1 - v / top), yc = (v) => T + (H - T - B) * (1 - v);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `spectrum of ${pack.name} at ${site}` },
    frac.map((f, i) => svg("rect", { x: L + i * w, y: y(f), width: Math.max(w - 0.5, 0.5), height: H - B - y(f), class: i < rank ? "sv in" : "sv" },
      svg("title", {}, `component ${i + 1}: ${(100 * f).toFixed(2)}% of the energy, cumulative ${(100 * cum[i]).toFixed(1)}%`))),
    svg("polyline", { points: cum.map((v, i) => `${L + (i + 0.5) * w},${yc(v)}`).join(" "), class: "line" }),
    rank ? svg("line", { x1: L + rank * w, x2: L + rank * w, y1: T, y2: H - B, class: "cut" }) : null,
    rank ? svg("text", { x: L + rank * w + 4, y: T + 12, class: "lbl" }, `rank ${rank}: ${(100 * cum[rank - 1]).toFixed(1)}%`) : null,
    axis(L, T, H - B, [0, top / 2, top].map((v) => [y(v), `${(100 * v).toFixed(1)}%`]), "start"),
    axis(W - R, T, H - B, [0, 0.5, 1].map((v) => [yc(v), `${100 * v}%`]), "end"),
    svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
    [1, Math.round(n / 2), n].map((i) => svg("text", { x: L + (i - 0.5) * w, y: H - B + 14, class: "tick", "text-anchor": "middle" }, String(i))),
    svg("text", { x: (W + L - R) / 2, y: H - 3, class: "tick", "text-anchor": "middle" },
      `component${shown < all.length ? ` (first ${shown} of ${all.length})` : ""}: bars energy share (left), line cumulative (right)`));
  box.replaceChildren(plot, el("p", { class: "muted small", text: `participation ratio ${pack.spectrum[site].participation_ratio}` }));
}

function axis(x, y0, y1, ticks, side) {
  const left = side === "start";
  return svg("g", {}, svg("line", { x1: x, x2: x, y1: y0, y2: y1, class: "axis" }),
    ticks.map(([y, t]) => svg("text", { x: left ? x - 4 : x + 4, y: y + 4, class: "tick", "text-anchor": left ? "end" : "start" }, t)));
}

// Principal angles between two packs: one row per site, one cell per angle (dark = aligned, 0°;
// light = orthogonal, 90°).
async function drawAngles() {
  const a = $("#ang-a").value, b = $("#ang-b").value, box = $("#ang-plot");
  say($("#ang-msg"), "");
  if (!a || !b) return say($("#ang-msg"), "pick two modes");
  let res;
  try {
    res = await getJSON(`v1/modes/${encodeURIComponent(a)}/angles/${encodeURIComponent(b)}`);
  } catch (e) {
    return say($("#ang-msg"), e.message);
  }
  const sites = Object.keys(res.angles);
  if (!sites.length) return box.replaceChildren(el("p", { class: "muted", text: `${a} and ${b} share no site (layer, K/V, group)` }));
  const cols = Math.max(...sites.map((s) => res.angles[s].length));
  const W = 560, L = 70, R = 70, T = 6, rowH = Math.min(26, Math.max(12, 220 / sites.length)), cw = (W - L - R) / cols;
  const H = T + rowH * sites.length + 44;
  const color = (deg) => `hsl(220, 70%, ${18 + (72 * deg) / 90}%)`;
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `principal angles between ${a} and ${b}` },
    sites.map((s, r) => svg("g", {},
      svg("text", { x: L - 6, y: T + r * rowH + rowH / 2 + 4, class: "tick", "text-anchor": "end" }, s),
      res.angles[s].map((deg, i) => svg("rect", { x: L + i * cw, y: T + r * rowH, width: Math.max(cw - 0.3, 0.3), height: rowH - 1, fill: color(deg) },
        svg("title", {}, `${s} angle ${i + 1}: ${deg.toFixed(1)}°`))),
      svg("text", { x: W - R + 6, y: T + r * rowH + rowH / 2 + 4, class: "tick" }, `cos² ${res.mean_cos2[s].toFixed(2)}`))),
    svg("text", { x: L, y: H - 26, class: "tick" }, `angle index 1…${cols} (ascending)`),
    Array.from({ length: 10 }, (_, i) => svg("rect", { x: L + 200 + i * 16, y: H - 36, width: 16, height: 10, fill: color(i * 10) })),
    svg("text", { x: L + 196, y: H - 27, class: "tick", "text-anchor": "end" }, "0°"),
    svg("text", { x: L + 364, y: H - 27, class: "tick" }, "90°"),
    svg("text", { x: L, y: H - 8, class: "tick" }, "dark: shared directions; light: orthogonal; cos²: mean overlap per site"));
  box.replaceChildren(plot);
}

async function uploadCalibration(ev) {
  ev.preventDefault();
  const form = ev.target, msg = $(".msg", form);
  const data = new FormData();
  for (const [k, v] of new FormData(form)) if (v !== "" && !(v instanceof File && !v.name)) data.append(k, v);
  say(msg, "uploading…", true);
  try {
    const job = await (await api("v1/modes", { method: "POST", body: data })).json();
    say(msg, `calibrate job ${job.id} queued: follow it in Jobs; the mode appears when it succeeds`, true);
    form.reset();
    refreshJobs();
  } catch (e) {
    say(msg, e.message);
  }
}

// ------------------------------------------------------------------ jobs

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await getJSON("v1/jobs?limit=50")).data;
  } catch (e) {
    if (e.status !== 401) say($("#jobs-msg"), e.message);
    return;
  }
  say($("#jobs-msg"), "");
  let modesChanged = false, adaptersChanged = false;
  for (const j of jobs) {
    const before = S.jobs.get(j.id);
    if (before && before.state !== "succeeded" && j.state === "succeeded") {
      if (j.type === "calibrate" || j.type === "pipeline") modesChanged = true;
      if (j.type === "distill" || j.type === "pipeline") adaptersChanged = true;
    }
    S.jobs.set(j.id, j);
  }
  const active = jobs.filter((j) => j.state === "queued" || j.state === "running").length;
  $("#jobs-active").textContent = active ? String(active) : "";
  $("#jobs-table tbody").replaceChildren(...jobs.map(jobRow));
  if (!jobs.length) $("#jobs-table tbody").append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "no jobs yet" })));
  fillSelect($("#ad-form select[name=job_id]"),
    jobs.filter((j) => (j.type === "distill" || j.type === "pipeline") && j.state === "succeeded").map((j) => j.id));
  if (modesChanged) await refreshModes();
  if (adaptersChanged) await refreshAdapters();
  renderArms(jobs.find((j) => j.type === "pipeline" && j.state === "succeeded"));
}

// The latest finished pipeline: accuracy of base, self-distill and spd on its evaluation set, each a
// bar with its 95% interval, and the paired comparison of spd with self-distill.
const ARMS = ["base", "self-distill", "spd"];

function renderArms(job) {
  const box = $("#pipeline-arms");
  const ev = job?.result?.evaluate;
  if (!ev) return box.replaceChildren();
  const rows = ARMS.filter((a) => ev[a] ?? (a === "spd" && ev.adapter)).map((a) => [a, ev[a] ?? ev.adapter]);
  const pct = (v) => `${(100 * v).toFixed(1)}%`;
  const chart = el("div", { class: "arms", role: "img", "aria-label": `accuracy per arm of ${job.id}` },
    ...rows.map(([arm, r]) => el("div", { class: "arm", "data-arm": arm },
      el("span", { class: "arm-name", text: arm }),
      el("div", { class: "arm-track" },
        el("div", { class: "arm-fill", style: `width: ${100 * r.value}%` }),
        el("div", { class: "arm-ci", style: `left: ${100 * r.ci_low}%; width: ${100 * (r.ci_high - r.ci_low)}%`,
                    title: `95% interval ${pct(r.ci_low)} to ${pct(r.ci_high)}` })),
      el("span", { class: "arm-value", text: `${pct(r.value)} [${pct(r.ci_low)}, ${pct(r.ci_high)}] n=${r.n}` }))));
  const vs = job.result.compare?.["spd-vs-self-distill"];
  const note = vs ? el("p", { class: "small", text: `spd − self-distill: ${(100 * vs.diff).toFixed(1)} points ` +
    `[${(100 * vs.ci_low).toFixed(1)}, ${(100 * vs.ci_high).toFixed(1)}], McNemar p = ${vs.mcnemar.p.toPrecision(2)}` }) : null;
  box.replaceChildren(el("h3", { text: `Result of ${job.id} (${job.result.evaluate.spd?.metric ?? "accuracy"})` }), chart, note);
}

function jobRow(j) {
  const pct = Math.round(100 * j.progress);
  const end = j.finished ?? (j.started ? Date.now() / 1000 : null);
  const result = j.error ?? (j.result ? summary(j.result) : "");
  return el("tr", { "data-job": j.id, "data-state": j.state },
    el("td", { class: "mono", text: j.id.replace(/^job-/, ""), title: j.id }),
    el("td", { text: j.type }),
    el("td", {}, el("span", { class: `state ${j.state}`, text: j.state })),
    el("td", {}, el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct },
      el("div", { class: `fill ${j.state}`, style: `width: ${pct}%` }), el("span", { text: `${pct}%${j.total ? ` (${j.done}/${j.total})` : ""}` }))),
    el("td", { text: j.started ? fmtTime(end - j.started) : "" }),
    el("td", { class: j.error ? "error small" : "small", text: result, title: result }),
    el("td", { class: "actions" },
      j.state === "succeeded" && j.artifact ? el("button", { type: "button", class: "link", text: "artifact", onclick: () => download(j) }) : null,
      j.state === "running" && S.cancelling.has(j.id) ? el("span", { class: "muted", text: "cancelling…" })
        : j.state === "queued" || j.state === "running" ? el("button", { type: "button", class: "link danger", text: "cancel", onclick: () => cancel(j) }) : null));
}

function summary(result) {
  const parts = Object.entries(result).filter(([, v]) => typeof v !== "object" || v === null).map(([k, v]) => `${k}: ${v}`);
  return parts.join(", ").slice(0, 200);
}

// A running step stops at its next checkpoint: the row says "cancelling…" until the state changes.
async function cancel(j) {
  try {
    await api(`v1/jobs/${encodeURIComponent(j.id)}`, { method: "DELETE" });
    S.cancelling.add(j.id);
  } catch (e) {
    say($("#jobs-msg"), e.message);
  }
  refreshJobs();
}

// The artifact needs the key, so it is fetched, then saved from a blob.
async function download(j) {
  try {
    const res = await api(`v1/jobs/${encodeURIComponent(j.id)}/artifact`);
    const name = /filename="?([^";]+)"?/.exec(res.headers.get("content-disposition") || "")?.[1] ?? `${j.id}-artifact`;
    const url = URL.createObjectURL(await res.blob());
    el("a", { href: url, download: name }).click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    say($("#jobs-msg"), e.message);
  }
}

async function dataSpec(row) {
  const file = $("input[type=file]", row).files[0], dataset = $(".dataset", row).value.trim(), limit = $(".limit", row).value;
  const spec = file ? { data: await file.text() } : dataset ? { dataset } : null;
  if (spec && limit) spec.limit = Number(limit);
  return spec;
}

async function startPipeline(ev) {
  ev.preventDefault();
  const form = ev.target, msg = $(".msg", form), f = new FormData(form);
  const params = { name: f.get("name"), task: f.get("task") };
  for (const k of ["strength", "max_tokens", "epochs"]) if (f.get(k) !== "") params[k] = Number(f.get(k));  // empty: the server's default
  if (f.get("rank")) params.calibration_params = { rank: Number(f.get("rank")) };
  if (f.get("adapter_name")) params.adapter_name = f.get("adapter_name");
  if (f.get("self_distill")) params.controls = ["self-distill"];
  for (const row of $$(".data-row", form)) {
    const spec = await dataSpec(row);
    if (spec) params[row.dataset.role] = spec;
    else if (!row.dataset.optional) return say(msg, `${row.dataset.role}: choose a file or name a data set`);
  }
  try {
    const job = await sendJSON("v1/jobs", "POST", { type: "pipeline", params });
    say(msg, `pipeline job ${job.id} queued`, true);
    refreshJobs();
  } catch (e) {
    say(msg, e.message);
  }
}

// ------------------------------------------------------------------ adapters

async function refreshAdapters() {
  let ad, models;
  try {
    [ad, models] = await Promise.all([getJSON("v1/adapters"), getJSON("v1/models")]);
  } catch (e) {
    return;
  }
  showModels(models.data);
  const loaded = ad.data.map((a) => a.name);
  const rows = [
    ...ad.data.map((a) => el("tr", {}, el("td", {}, el("b", { text: a.name })), el("td", { class: "ok", text: "loaded" }),
      el("td", { class: "small", text: provenance(a.provenance), title: a.provenance ? JSON.stringify(a.provenance, null, 1) : "" }),
      el("td", {}, el("button", { type: "button", class: "link danger", text: "unload", onclick: () => adapterCall(`unloaded ${a.name}`, `v1/adapters/${encodeURIComponent(a.name)}`, "DELETE") })))),
    ...ad.available.filter((n) => !loaded.includes(n)).map((n) => el("tr", {}, el("td", { text: n }), el("td", { class: "muted", text: "in the adapters dir" }), el("td"),
      el("td", {}, el("button", { type: "button", class: "link", text: "load", onclick: () => adapterCall(`loaded ${n}`, "v1/adapters", "POST", { name: n, directory: n }) })))),
  ];
  $("#ad-table tbody").replaceChildren(...rows);
  if (!rows.length) $("#ad-table tbody").append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "no adapters" })));
}

// What a job-made adapter was made from (GET /v1/adapters `provenance`), in one line.
function provenance(p) {
  if (!p) return "";
  const modes = p.modes.length ? p.modes.map((m) => `${m.name} (${(m.digest ?? "deleted").slice(0, 8)})`).join(" + ") : "no mode";
  const d = p.distill;
  return `job ${p.job.replace(/^job-/, "")}: corpus ${p.corpus_sha256.slice(0, 8)} under ${modes}; ` +
    `LoRA r ${d.lora_rank}, alpha ${d.lora_alpha}, lr ${d.lr}, ${d.epochs} epochs, seed ${d.seed}`;
}

async function adapterCall(done, path, method, body) {
  const msg = $(".msg", $("#ad-form"));
  try {
    await (body ? sendJSON(path, method, body) : api(path, { method }));
    say(msg, done, true);
  } catch (e) {
    say(msg, e.message);
  }
  refreshAdapters();
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("#auth-form").addEventListener("submit", (ev) => { ev.preventDefault(); connect($("#auth-key").value); });
  $("#forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_ITEM); S.key = null; unauthorized(""); });
  $$("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#play-form").addEventListener("submit", runPlayground);
  $("#play-stop").addEventListener("click", stopPlayground);
  $("#spec-pack").addEventListener("change", () => showSpectrum($("#spec-pack").value));
  $("#spec-site").addEventListener("change", drawSpectrum);
  $("#ang-run").addEventListener("click", drawAngles);
  $("#upload-form").addEventListener("submit", uploadCalibration);
  $("#pipeline-form").addEventListener("submit", startPipeline);
  $("#ad-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    if (!f.get("job_id")) return say($(".msg", ev.target), "no finished distill or pipeline job to load from");
    adapterCall(`loaded ${f.get("name")} from ${f.get("job_id")}`, "v1/adapters", "POST", { name: f.get("name"), job_id: f.get("job_id") });
  });
  const saved = localStorage.getItem(KEY_ITEM);
  if (saved === null) unauthorized("");  // first visit: ask for the key once
  else connect(saved);
});
