// fleetml dashboard: a client of the HTTP API v1, nothing more. The API decides
// who may see and do what; this page only shows what the API answers. Shared
// parts (API client, session, DOM helpers) are in lib.js.

import { API, api, call, h, hasAny, onSignedOut, renew, report, saveSession, session,
  show, signedOut, when } from "./lib.js";
import { modelsPage } from "./models.js";
import { auditPage, provisioningPage, usersPage } from "./admin.js";

const $nav = document.getElementById("nav");
const $who = document.getElementById("who");

// ---- sign-in ----------------------------------------------------------------------

function signInPage(message) {
  $nav.hidden = true;
  const err = h("p", { class: "error", role: "alert", id: "signin-error" }, message || "");
  const otp = h("label", { hidden: true }, "One-time code",
    h("input", { name: "otp", inputmode: "numeric", autocomplete: "one-time-code", maxlength: 6 }));
  const form = h("form", { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("label", {}, "Hospital (tenant)", h("input", { name: "tenant", required: true, autocomplete: "organization" })),
    h("label", {}, "Username", h("input", { name: "username", required: true, autocomplete: "username" })),
    h("label", {}, "Password", h("input", { name: "password", type: "password", required: true, autocomplete: "current-password" })),
    otp,
    h("button", { type: "submit" }, "Sign in"),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const body = { tenant: f.get("tenant"), username: f.get("username"), password: f.get("password") };
    if (f.get("otp")) body.otp = f.get("otp");
    err.textContent = "";
    try {
      const t = await call("POST", "/auth/login", body);
      saveSession({ access: t.access_token, refresh: t.refresh_token });
      const me = await api("GET", "/me");
      saveSession({ ...session, username: me.username, tenant: me.tenant, roles: me.roles });
      render();
    } catch (e) {
      if (e.code === "mfa_required" && otp.hidden) {
        otp.hidden = false;
        err.textContent = "Enter the one-time code from your authenticator app.";
      } else if (e.status === 401) {
        err.textContent = "Wrong tenant, username, password or code.";
      } else if (e.status === 429) {
        err.textContent = "Too many attempts; wait a moment and try again.";
      } else {
        err.textContent = `Sign-in failed: ${e.message}`;
      }
    }
  });
  show(form);
}

document.getElementById("signout").addEventListener("click", async () => {
  try {
    if (session) await call("POST", "/auth/logout", { refresh_token: session.refresh });
  } catch (_) { /* signed out locally either way */ }
  signedOut("Signed out.");
});

// ---- fleet ------------------------------------------------------------------------

async function allDevices() {
  const out = [];
  let cursor = "";
  for (let i = 0; i < 50; i++) {
    const page = await api("GET", `/devices?limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    out.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return out;
}

// A certificate ending within this many days is flagged in the fleet.
const CERT_WARN_DAYS = 30;

function certCell(iso) {
  if (!iso) return h("td", { class: "range" }, "unknown");
  const days = (new Date(iso).getTime() - Date.now()) / 86400000;
  const soon = days < CERT_WARN_DAYS;
  return h("td", { class: soon ? "error" : "", title: iso },
    new Date(iso).toLocaleDateString(), soon ? ` (${days < 0 ? "expired" : `${Math.ceil(days)} days`})` : "");
}

function presenceCell(d) {
  return h("td", { class: d.online ? "online" : "offline", "data-presence": d.id }, d.online ? "online" : "offline");
}

async function fleetPage() {
  // The stream opens first and the list is read once it is live, so no
  // change falls between the two; changes that arrive before the list are
  // applied after it, in order (each is a device's state at that moment).
  const $live = h("span", { id: "live", class: "range" }, "connecting");
  let apply = null;
  const early = [];
  const ready = new Promise((resolve) => startLive("/fleet/events", (ev, p) => {
    if (ev !== "presence") return;
    if (apply) apply(p);
    else early.push(p);
  }, $live, resolve));
  await Promise.race([ready, new Promise((resolve) => setTimeout(resolve, 3000))]);
  const devices = await allDevices();
  const byId = new Map(devices.map((d) => [d.id, d]));
  const search = h("input", { type: "search", placeholder: "Search id, firmware, group", id: "search", "aria-label": "Search" });
  const status = h("select", { id: "status-filter", "aria-label": "Status" },
    h("option", { value: "" }, "Any status"),
    ["active", "disabled", "revoked"].map((s) => h("option", { value: s }, s)));
  const online = h("select", { id: "online-filter", "aria-label": "Connection" },
    h("option", { value: "" }, "Online or not"),
    h("option", { value: "online" }, "online"), h("option", { value: "offline" }, "offline"));
  const count = h("span", { class: "range", id: "fleet-count" });
  const body = h("tbody");
  const fill = () => {
    const q = search.value.trim().toLowerCase();
    const rows = devices.filter((d) => (!status.value || d.status === status.value) &&
      (!online.value || (online.value === "online") === !!d.online) &&
      (!q || [d.id, d.firmware, d.group, d.model].some((v) => (v || "").toLowerCase().includes(q))));
    const n = devices.filter((d) => d.online).length;
    count.textContent = `${devices.length} devices, ${n} online`;
    body.replaceChildren(...rows.map((d) => h("tr", { "data-device": d.id },
      h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
      h("td", {}, d.status),
      presenceCell(d),
      h("td", {}, when(d.last_seen)),
      h("td", { class: "firmware" }, d.firmware),
      certCell(d.cert_expires_at),
      h("td", {}, d.group))));
  };
  search.addEventListener("input", fill);
  status.addEventListener("change", fill);
  online.addEventListener("change", fill);
  // Devices connecting and disconnecting, pushed as they happen.
  apply = (p) => {
    const d = byId.get(p.device);
    if (!d) return;
    d.online = p.online;
    if (p.changed_at && (!d.last_seen || p.changed_at > d.last_seen)) d.last_seen = p.changed_at;
    fill();
  };
  early.forEach(apply);
  fill();
  show(h("h1", {}, "Fleet"),
    h("div", { class: "toolbar" }, search, status, online, count, $live),
    h("div", { class: "scroll" }, h("table", { id: "fleet" },
      h("thead", {}, h("tr", {}, ["Device", "Status", "Connection", "Last seen", "Firmware", "Certificate until", "Group"]
        .map((c) => h("th", {}, c)))),
      body)));
}

// ---- device -----------------------------------------------------------------------

const CONE_RADIUS_M = 0.024; // viscosity.sweep.v1: cone-plate, docs/protocol.md §3

// Apparent viscosity (mPa·s) of each step, from the steady part (last half) of
// its torque readings: tau = 3M / (2 pi R^3), eta = tau / shear rate.
function apparentViscosity(sweep) {
  const xs = [], ys = [];
  for (const step of sweep) {
    const s = step.samples.slice(Math.floor(step.samples.length / 2));
    const torque = s.reduce((a, b) => a + b, 0) / s.length * 1e-6;
    const tau = 3 * torque / (2 * Math.PI * CONE_RADIUS_M ** 3);
    const eta = tau / step.shear_rate_s * 1000;
    if (eta > 0 && Number.isFinite(eta)) { xs.push(step.shear_rate_s); ys.push(eta); }
  }
  return [xs, ys];
}

const OUTPUT_NAMES = {
  viscosity_high_mpas: "Viscosity at high shear (300 1/s)",
  viscosity_low_mpas: "Viscosity at low shear (1 1/s)",
  hematocrit_pct: "Hematocrit",
};

// Units and plausible ranges of each output, from the served models'
// manifests (GET /models); empty when the user may not read them.
let outputInfo = null;
async function outputsInfo() {
  if (outputInfo) return outputInfo;
  outputInfo = {};
  try {
    const models = await api("GET", "/models");
    for (const m of models.items || [])
      for (const o of m.outputs || []) outputInfo[o.name] = o;
  } catch (_) { /* the result is shown without ranges */ }
  return outputInfo;
}

let plot = null;

function drawPlot(container, detail) {
  const [xs, ys] = apparentViscosity(detail.measurement.sweep);
  if (plot) { plot.destroy(); plot = null; }
  container.replaceChildren();
  if (!window.uPlot || xs.length < 2) {
    container.append(h("p", { class: "range" }, "No plottable sweep."));
    return;
  }
  const width = Math.max(320, Math.min(760, container.clientWidth || 760));
  plot = new window.uPlot({
    width, height: 320,
    title: `Sweep ${detail.id}`,
    scales: { x: { time: false, distr: 3 }, y: { distr: 3 } },
    axes: [{ label: "Shear rate (1/s)" }, { label: "Apparent viscosity (mPa·s)" }],
    series: [{ label: "shear rate" }, { label: "viscosity (mPa·s)", stroke: "#1f5fbf", width: 2, points: { show: true } }],
  }, [xs, ys], container);
}

function outputsList(result, info) {
  const dl = h("dl", { class: "outputs" });
  for (const [k, v] of Object.entries((result && result.outputs) || {})) {
    const o = info[k] || {};
    const unit = (o.unit || "").replace("*", "·");
    const range = o.min !== undefined && o.max !== undefined ? ` (plausible ${o.min}–${o.max} ${unit})` : "";
    dl.append(h("dt", {}, OUTPUT_NAMES[k] || k), h("dd", { "data-output": k },
      `${Number(v).toFixed(2)} ${unit}`, range ? h("span", { class: "range" }, range) : null));
  }
  return dl;
}

// The shadow: desired (set here), reported (by the device) and their delta.
// Those who manage devices change desired with a JSON merge patch (RFC 7396:
// null removes a key).
function shadowBox(id, shadow) {
  const pre = h("pre", { id: "shadow" });
  const paint = (s) => {
    pre.textContent = JSON.stringify({ desired: s.desired, reported: s.reported, delta: s.delta }, null, 2);
  };
  paint(shadow);
  const box = h("section", { class: "card" }, h("h2", {}, "Shadow"), pre);
  if (!hasAny(["admin", "device_manager", "operator"])) return box;
  const patch = h("textarea", { id: "desired-patch", rows: 3, cols: 60, "aria-label": "Desired state patch (JSON)",
    placeholder: '{"sample_interval_s": 30}' });
  const err = h("p", { class: "error", id: "desired-error" });
  const form = h("form", { class: "toolbar", id: "desired-form" },
    h("label", {}, "Change desired state (JSON merge patch)", patch),
    h("button", { type: "submit", id: "desired-save" }, "Apply"), err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    let desired;
    try {
      desired = JSON.parse(patch.value);
    } catch (_) {
      err.textContent = "That is not JSON.";
      return;
    }
    try {
      paint(await api("PATCH", `/devices/${encodeURIComponent(id)}/shadow`, { desired }));
      patch.value = "";
    } catch (e) {
      err.textContent = e.status === 403 ? "You are not allowed to change it." : `Not applied: ${e.message}`;
    }
  });
  box.append(form);
  return box;
}

// The reference value a clinician enters for a measurement (e.g. the lab's
// hematocrit), stored as the measurement's label for retraining, with every
// earlier value it corrected (the label log) listed under it.
function labelText(l) {
  return `${Object.entries(l.outputs).map(([k, v]) => `${OUTPUT_NAMES[k] || k} ${v}`).join(", ")}` +
    ` (${l.source}, by ${l.labelled_by}, ${when(l.labelled_at)})`;
}

function labelBox(detail, refresh) {
  const cur = detail.label;
  const shown = h("p", { id: "label" }, cur ? `Label: ${labelText(cur)}` : "No label yet.");
  const history = h("ol", { id: "label-history", class: "range" });
  if (cur) {
    api("GET", `/devices/${encodeURIComponent(detail.device_id)}/measurements/${encodeURIComponent(detail.id)}/labels`)
      .then((r) => {
        const earlier = (r.items || []).slice(0, -1); // the last is the current one
        if (earlier.length)
          history.replaceChildren(h("li", { class: "plain" }, "Corrected from:"),
            ...earlier.reverse().map((l) => h("li", { "data-label-at": l.labelled_at }, labelText(l))));
      })
      .catch(() => { /* the current label is shown either way */ });
  }
  if (!hasAny(["clinician"])) return h("div", {}, shown, history);
  const err = h("p", { class: "error", id: "label-error" });
  const input = h("input", { id: "label-hct", type: "number", step: "0.1", min: "0", max: "100", required: true,
    "aria-label": "Lab hematocrit (%)" });
  const form = h("form", { class: "toolbar", id: "label-form" },
    h("label", {}, cur ? "Correct: lab hematocrit (%)" : "Lab hematocrit (%)", input),
    h("button", { type: "submit", id: "label-save" }, cur ? "Save correction" : "Save label"), err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    try {
      await api("PUT", `/devices/${encodeURIComponent(detail.device_id)}/measurements/${encodeURIComponent(detail.id)}/label`,
        { outputs: { hematocrit_pct: Number(input.value) }, source: "lab" });
      await refresh();
    } catch (e) {
      err.textContent = e.status === 403 ? "You are not allowed to label measurements." : `Not saved: ${e.message}`;
    }
  });
  return h("div", {}, shown, history, form);
}

async function deviceAction(id, what) {
  const verbs = { disable: "Disable", enable: "Enable", revoke: "Revoke (final)" };
  if (!window.confirm(`${verbs[what]} device ${id}?`)) return;
  await api("POST", `/devices/${encodeURIComponent(id)}/${what}`, {});
  render();
}

async function devicePage(id) {
  const enc = encodeURIComponent(id);
  const forbiddenAsNull = (e) => { if (e.status === 403) return null; throw e; };
  const [dev, listed, shadow] = await Promise.all([
    api("GET", `/devices/${enc}`),
    api("GET", `/devices/${enc}/measurements?limit=50`).catch(forbiddenAsNull),
    api("GET", `/devices/${enc}/shadow`).catch(() => null),
  ]);
  // Roles without measurements.read (e.g. admin) still see the device.
  const page = listed || { items: [] };
  const plotBox = h("div", { id: "plot" });
  const resultBox = h("div", { id: "result" });
  const rows = h("tbody");
  const select = async (m, tr) => {
    for (const r of rows.children) r.classList.remove("selected");
    if (tr) tr.classList.add("selected");
    const detail = await api("GET", `/devices/${enc}/measurements/${encodeURIComponent(m.id)}`);
    drawPlot(plotBox, detail);
    resultBox.replaceChildren(...[
      h("h2", {}, "Result"),
      outputsList(detail.result, await outputsInfo()),
      h("p", { class: "range" }, `Model ${detail.model} · firmware `, h("span", { class: "firmware" }, detail.measurement.firmware)),
      labelBox(detail, () => select(m, tr)),
    ].filter(Boolean));
  };
  const row = (m) => {
    const tr = h("tr", { class: "clickable", "data-measurement": m.id },
      h("td", {}, m.id), h("td", {}, when(m.taken_at)), h("td", {}, m.model),
      h("td", {}, m.result && m.result.outputs ? Number(m.result.outputs.hematocrit_pct).toFixed(1) : ""));
    tr.addEventListener("click", () => select(m, tr).catch(report));
    return tr;
  };
  for (const m of page.items) rows.append(row(m));
  const $live = h("span", { id: "live" }, "connecting");
  // A new measurement arrives: on top of the list, plotted at once.
  const arrived = (m) => {
    if (rows.querySelector(`tr[data-measurement="${CSS.escape(m.id)}"]`)) return;
    const tr = row(m);
    rows.prepend(tr);
    select(m, tr).catch(report);
  };
  const actions = hasAny(["admin", "device_manager", "operator"]) && dev.status !== "revoked"
    ? h("div", { class: "toolbar" },
      dev.status === "active"
        ? h("button", { class: "plain", id: "disable", onclick: () => deviceAction(id, "disable").catch(report) }, "Disable")
        : h("button", { class: "plain", id: "enable", onclick: () => deviceAction(id, "enable").catch(report) }, "Enable"),
      h("button", { class: "danger", id: "revoke", onclick: () => deviceAction(id, "revoke").catch(report) }, "Revoke"))
    : null;
  show(
    h("h1", {}, "Device ", h("span", { id: "device-id" }, dev.id)),
    h("p", {}, h("span", { id: "device-status" }, dev.status), " · ", $live, " · ",
      h("span", { class: dev.online ? "online" : "offline" }, dev.online ? "online" : "offline"),
      " · last seen ", when(dev.last_seen), " · firmware ", h("span", { class: "firmware" }, dev.firmware)),
    actions,
    h("div", { class: "grid" },
      h("section", { class: "card" }, plotBox),
      h("section", { class: "card" }, resultBox)),
    h("section", { class: "card" }, h("h2", {}, "Measurements"),
      h("table", { id: "measurements" },
        h("thead", {}, h("tr", {}, ["Measurement", "Taken", "Model", "Hematocrit %"].map((c) => h("th", {}, c)))),
        rows)),
    shadow ? shadowBox(id, shadow) : null);
  if (!listed) {
    resultBox.append(h("p", { class: "range", id: "no-measurements-access" },
      "Your roles do not include reading measurements."));
    $live.textContent = "not live";
    return;
  }
  if (page.items.length) await select(page.items[0], rows.firstChild);
  else resultBox.append(h("p", { class: "range" }, "No measurements yet."));
  startLive(`/devices/${enc}/events`, (ev, m) => { if (ev === "measurement") arrived(m); }, $live);
}

// ---- live streams ------------------------------------------------------------------

// Server-Sent Events (GET /devices/{id}/events, GET /fleet/events), read with
// fetch() so the token goes in the Authorization header (EventSource cannot
// send one). A stream ends when the access token expires; it is then reopened
// with a renewed token. Only one stream is open: the shown page's.
let live = null;

function stopLive() {
  if (live) live.abort();
  live = null;
}

// onEvent(name, data) for each event but "ready", which sets $state to "live"
// and calls onReady (if given) the first time.
function startLive(path, onEvent, $state, onReady) {
  stopLive();
  const ctl = new AbortController();
  live = ctl;
  const run = async (attempt) => {
    if (ctl.signal.aborted) return;
    try {
      let r = await fetch(API + path, {
        headers: { Authorization: `Bearer ${session.access}`, Accept: "text/event-stream" },
        signal: ctl.signal, cache: "no-store", credentials: "omit",
      });
      if (r.status === 401) {
        await renew();
        return run(attempt);
      }
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += value;
        let cut;
        while ((cut = pending.indexOf("\n\n")) >= 0) {
          const block = pending.slice(0, cut);
          pending = pending.slice(cut + 2);
          let event = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (event === "ready") {
            $state.textContent = "live";
            attempt = 0;
            if (onReady) onReady();
            onReady = null;
          }
          else if (data) onEvent(event, JSON.parse(data));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
      if (e && e.status === 401) { // the refresh token is no longer valid
        signedOut("Your session has ended; please sign in again.");
        return;
      }
    }
    $state.textContent = "reconnecting";
    setTimeout(() => run(attempt + 1), Math.min(10000, 500 * 2 ** attempt));
  };
  run(0);
}

// ---- routing ----------------------------------------------------------------------

// Each page: the hash it answers, and who sees its link (the API decides
// access; hiding a link only spares a 403).
const pages = [
  { re: /^#\/devices\/([^/]+)$/, draw: (m) => devicePage(decodeURIComponent(m[1])) },
  { re: /^#\/models$/, draw: modelsPage, nav: "nav-models", roles: ["admin", "clinician", "data_scientist", "operator"] },
  { re: /^#\/provisioning$/, draw: provisioningPage, nav: "nav-provisioning", roles: ["admin", "operator"] },
  { re: /^#\/users$/, draw: usersPage, nav: "nav-users", roles: ["admin", "operator"] },
  { re: /^#\/audit$/, draw: auditPage, nav: "nav-audit", roles: ["admin", "operator"] },
];

async function render(message) {
  stopLive();
  if (!session) return signInPage(message);
  $nav.hidden = false;
  $who.textContent = `${session.username || ""} · ${session.tenant || ""}`;
  for (const p of pages) if (p.nav) document.getElementById(p.nav).hidden = !hasAny(p.roles);
  try {
    for (const p of pages) {
      const m = location.hash.match(p.re);
      if (m) return await p.draw(m);
    }
    await fleetPage();
  } catch (e) {
    report(e);
  }
}

onSignedOut(render);
window.addEventListener("hashchange", () => render());
render();
