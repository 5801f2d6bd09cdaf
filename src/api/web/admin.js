// fleetml dashboard: administration pages (provisioning, users, audit). As
// everywhere in the dashboard, the API decides: a role without the permission
// gets the API's 403, which report() (in app.js's router) shows in place of
// the page. Every action shows its error in the page, never as an exception.

import { api, confirmed, formError, h, show, when } from "./lib.js";

// docs/openapi.yaml, schema Role.
const ROLES = ["admin", "clinician", "data_scientist", "device_manager", "operator"];

// ---- shared helpers ---------------------------------------------------------------

// Every page of a list answered with next_cursor (GET /users: a tenant has few
// users, so all are shown at once, as the fleet shows all devices).
async function allPages(path) {
  const out = [];
  let cursor = "";
  for (let i = 0; i < 50; i++) {
    const page = await api("GET", `${path}?limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    out.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return out;
}

function errorBox(id) {
  return h("p", { class: "error", role: "alert", id });
}

// The five roles as checkboxes; the legend is shown in forms, and is only a
// label for screen readers in a table row.
function roleBoxes(checked, label, visible = true) {
  return h("fieldset", { class: "roles", "aria-label": visible ? null : label },
    visible ? h("legend", { class: "range" }, label) : null,
    ROLES.map((r) => h("label", { class: "check" },
      h("input", { type: "checkbox", name: "role", value: r, checked: checked.includes(r) }), r)));
}

function checkedRoles(container) {
  return [...container.querySelectorAll("input[name=role]:checked")].map((i) => i.value);
}

// Object URLs of the claim certificates offered on the shown page. They hold
// a private key, so they are released as soon as the page is left or redrawn
// rather than when the tab closes.
let offered = [];
function releaseDownloads() {
  for (const u of offered) URL.revokeObjectURL(u);
  offered = [];
}
window.addEventListener("hashchange", releaseDownloads);

function downloadLink(id, filename, text, label) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/x-pem-file" }));
  offered.push(url);
  return h("a", { id, href: url, download: filename, class: "download" }, label);
}

// ---- provisioning -----------------------------------------------------------------

function templateForm(redraw) {
  const err = errorBox("template-form-error");
  const num = (name, value, min, max) => h("input", { name, type: "number", value, min, max, required: true });
  const form = h("form", { class: "card spaced", id: "template-form" },
    h("h2", {}, "New template"),
    h("div", { class: "form-grid" },
      h("label", {}, "Name", h("input", { name: "name", required: true, pattern: "[a-z0-9][a-z0-9\\-]{1,62}",
        title: "2 to 63 lower case letters, digits and -", autocomplete: "off" })),
      h("label", {}, "Group (optional)", h("input", { name: "group", maxlength: 64 })),
      h("label", {}, "Device id prefix", h("input", { name: "device_prefix", maxlength: 32, placeholder: "the template's name" })),
      h("label", {}, "Certificate validity (days)", num("cert_days", 825, 1, 3650)),
      h("label", {}, "Provisioning requests per minute (0: no limit)", num("rate_per_min", 60, 0, 100000)),
      h("label", {}, "Pre-provisioning hook (optional)", h("input", { name: "hook", maxlength: 511,
        placeholder: "https://… or /path/to/program" }))),
    h("label", {}, "Allowed serial numbers (one per line or comma-separated; empty: any serial)",
      h("textarea", { name: "serials", rows: 3 })),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "allow_reprovision" }),
      "A provisioned serial may get a new certificate"),
    h("div", { class: "toolbar" }, h("button", { type: "submit", id: "template-create" }, "Create template")),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const f = new FormData(form);
    // The numbers start at the API's defaults; the optional texts are sent
    // only when filled in (the API's defaults apply otherwise).
    const body = { name: f.get("name").trim(), cert_days: Number(f.get("cert_days")),
      rate_per_min: Number(f.get("rate_per_min")), allow_reprovision: f.get("allow_reprovision") !== null };
    for (const k of ["group", "device_prefix", "hook"]) if (f.get(k).trim()) body[k] = f.get(k).trim();
    const serials = f.get("serials").split(/[\s,]+/).filter(Boolean);
    if (serials.length) body.serials = serials;
    try {
      await api("POST", "/templates", body);
    } catch (e) {
      err.textContent = formError(e, "Not created");
      return;
    }
    redraw();
  });
  return form;
}

// A new claim certificate: the answer (certificate and private key) is offered
// as a file and never written into the page, since the server keeps no copy.
async function issueClaim(name, offer, err, button) {
  err.textContent = "";
  offer.replaceChildren();
  releaseDownloads();
  button.disabled = true; // each click issues another certificate
  let c;
  try {
    c = await api("POST", `/templates/${encodeURIComponent(name)}/claim-cert`);
  } catch (e) {
    err.textContent = formError(e, "No certificate issued");
    return;
  } finally {
    button.disabled = false;
  }
  offer.replaceChildren(h("section", { class: "card warning", role: "alert" },
    h("h2", {}, `Claim certificate for ${name}`),
    h("p", {}, "This file holds the certificate and its private key. The key is given out only once: the server does not ",
      "keep it and it cannot be downloaded again after you leave this page. Store it securely; every device flashed with ",
      "it can ask for its own identity under this template."),
    h("p", { class: "toolbar" },
      downloadLink("claim-download", `claim-${name}-${c.serial}.pem`, c.certificate_pem + c.private_key_pem,
        "Download certificate and private key"),
      downloadLink("claim-ca-download", "fleetml-ca.pem", c.ca_pem, "Download the CA certificate")),
    h("p", { class: "range" }, `Serial ${c.serial}`)));
}

async function drawProvisioning() {
  releaseDownloads();
  const list = await api("GET", "/templates");
  const err = errorBox("templates-error");
  const offer = h("div", { id: "claim-offer" });
  const yesNo = (b) => (b ? "yes" : "no");
  const rows = (list.items || []).map((t) => h("tr", { "data-template": t.name },
    h("td", {}, t.name), h("td", {}, t.group), h("td", {}, `${t.device_prefix}-<serial>`),
    h("td", {}, String(t.cert_days)), h("td", {}, t.rate_per_min ? String(t.rate_per_min) : "no limit"),
    h("td", {}, t.has_allowlist ? "listed only" : "any"), h("td", {}, yesNo(t.allow_reprovision)),
    h("td", { class: "hook" }, t.hook), h("td", {}, t.status), h("td", {}, when(t.created_at)),
    h("td", {}, h("button", { type: "button", class: "plain", "data-action": "claim-cert",
      onclick: (ev) => issueClaim(t.name, offer, err, ev.currentTarget) }, "New claim certificate"))));
  show(h("h1", {}, "Provisioning"),
    h("p", { class: "range" }, "Devices holding a template's claim certificate provision themselves over MQTT ",
      "(docs/protocol.md §10) and get the id <prefix>-<serial>."),
    offer, err,
    rows.length
      ? h("div", { class: "scroll" }, h("table", { id: "templates" },
        h("thead", {}, h("tr", {}, ["Template", "Group", "Device ids", "Certificate days", "Requests/min", "Serials",
          "Re-provision", "Hook", "Status", "Created", ""].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows)))
      : h("p", { class: "range", id: "no-templates" }, "No templates yet."),
    templateForm(() => drawProvisioning().catch(reportHere(err))));
}

// A redraw that fails after an action leaves the page as it was, with the
// error in it.
function reportHere(err) {
  return (e) => { err.textContent = formError(e, "Could not reload the page"); };
}

export async function provisioningPage() { await drawProvisioning(); }

// ---- users ------------------------------------------------------------------------

// An initial password for a new user, made in the browser (the API takes the
// password, it does not make one): 20 characters from 56 unambiguous ones,
// about 116 bits, grouped for reading out.
function newPassword() {
  const abc = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
  const out = [];
  while (out.length < 20) {
    const bytes = crypto.getRandomValues(new Uint8Array(32));
    for (const b of bytes) if (b < abc.length * 4 && out.length < 20) out.push(abc[b % abc.length]);
  }
  return out.join("").match(/.{4}/g).join("-");
}

function userForm(redraw) {
  const err = errorBox("user-form-error");
  const roles = roleBoxes([], "Roles");
  const form = h("form", { class: "card spaced", id: "user-form" },
    h("h2", {}, "New user"),
    h("div", { class: "form-grid" },
      h("label", {}, "Username", h("input", { name: "username", required: true, maxlength: 64, autocomplete: "off",
        pattern: "[A-Za-z0-9][A-Za-z0-9._@\\-]{0,63}" })),
      h("label", {}, "Initial password (empty: generate one)", h("input", { name: "password", type: "password",
        minlength: 12, maxlength: 128, autocomplete: "new-password" }))),
    roles,
    h("div", { class: "toolbar" }, h("button", { type: "submit", id: "user-create" }, "Create user")),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const f = new FormData(form);
    const username = f.get("username").trim();
    const chosen = checkedRoles(roles);
    if (!chosen.length) {
      err.textContent = "Choose at least one role.";
      return;
    }
    const generated = !f.get("password");
    const password = generated ? newPassword() : f.get("password");
    let u;
    try {
      u = await api("POST", "/users", { username, password, roles: chosen });
    } catch (e) {
      err.textContent = e.code === "weak_password" ? `Password refused: ${e.message}` : formError(e, "Not created");
      return;
    }
    // The password is shown once, here, and only if the page made it up.
    redraw(h("section", { class: "card warning", role: "status", id: "user-created", "data-user": u.username },
      h("p", {}, `User ${u.username} created with roles ${u.roles.join(", ")}.`),
      generated ? h("p", {}, "Initial password, shown only this once: ", h("code", { class: "secret", id: "user-secret" }, password),
        ". Give it to the user in person; they sign in with it and should change it.") : null));
  });
  return form;
}

async function drawUsers(notice) {
  const users = await allPages("/users");
  const err = errorBox("users-error");
  const redraw = (n) => drawUsers(n).catch(reportHere(err));
  // Asks, does, redraws; the API's refusal is shown above the table.
  const act = async (question, method, path, body) => {
    if (!confirmed(question)) return;
    err.textContent = "";
    try {
      await api(method, path, body);
    } catch (e) {
      err.textContent = formError(e, "Not changed");
      return;
    }
    redraw();
  };
  const rows = users.map((u) => {
    const enc = encodeURIComponent(u.username);
    const roles = roleBoxes(u.roles || [], `Roles of ${u.username}`, false);
    const saveRoles = () => {
      const chosen = checkedRoles(roles);
      if (!chosen.length) {
        err.textContent = `Choose at least one role for ${u.username}.`;
        return;
      }
      return act(`Change the roles of ${u.username} to ${chosen.join(", ")}? Their open sessions get the new roles at once.`,
        "PUT", `/users/${enc}/roles`, { roles: chosen });
    };
    const active = u.status === "active";
    return h("tr", { "data-user": u.username },
      h("td", {}, u.username),
      h("td", {}, roles),
      h("td", { class: active ? "" : "error", "data-status": u.status }, u.status),
      h("td", { "data-mfa": u.mfa ? "on" : "off" }, u.mfa ? "on" : "off"),
      h("td", {}, when(u.created_at)),
      h("td", {}, h("div", { class: "actions" },
        h("button", { type: "button", class: "plain", "data-action": "roles", onclick: saveRoles }, "Save roles"),
        active
          ? h("button", { type: "button", class: "plain", "data-action": "disable",
            onclick: () => act(`Disable ${u.username}? They are signed out everywhere at once.`,
              "POST", `/users/${enc}/disable`, {}) }, "Disable")
          : h("button", { type: "button", class: "plain", "data-action": "enable",
            onclick: () => act(`Enable ${u.username} again?`, "POST", `/users/${enc}/enable`, {}) }, "Enable"),
        u.mfa
          ? h("button", { type: "button", class: "plain", "data-action": "mfa-reset",
            onclick: () => act(`Remove the second factor of ${u.username} (a lost phone)? They are signed out everywhere ` +
              "and then sign in with the password alone.", "POST", `/users/${enc}/mfa/reset`, {}) }, "Reset second factor")
          : null)));
  });
  show(h("h1", {}, "Users"),
    notice || null,
    err,
    h("div", { class: "scroll" }, h("table", { id: "users" },
      h("thead", {}, h("tr", {}, ["User", "Roles", "Status", "Second factor", "Created", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows))),
    userForm(redraw));
}

export async function usersPage() { await drawUsers(null); }

// ---- audit ------------------------------------------------------------------------

// docs/openapi.yaml, schema AuditAction, and the model registry's actions:
// suggestions only, any action can be typed.
const ACTIONS = ["auth.login", "auth.refresh", "auth.refresh_reuse", "auth.logout", "user.password", "user.create",
  "user.roles", "user.disable", "user.enable", "user.mfa", "user.mfa_reset", "device.disable", "device.enable",
  "device.revoke", "device.shadow", "template.create", "template.claim_cert", "device.list", "measurement.list",
  "measurement.read", "label.write", "model.predict", "model.upload", "model.approve", "model.reject", "model.deploy",
  "access.denied"];

// A datetime-local value (the browser's time zone) as RFC 3339 UTC.
function isoOf(local) {
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

export async function auditPage() {
  const err = errorBox("audit-error");
  const body = h("tbody");
  const more = h("button", { type: "button", class: "plain", id: "audit-more", hidden: true }, "More");
  const count = h("span", { class: "range", id: "audit-count" });
  const form = h("form", { class: "toolbar filters", id: "audit-filter" },
    h("label", {}, "Actor", h("input", { name: "actor", placeholder: "user:demo-hospital/alice", autocomplete: "off" })),
    h("label", {}, "Action", h("input", { name: "action", list: "audit-actions", autocomplete: "off" })),
    h("datalist", { id: "audit-actions" }, ACTIONS.map((a) => h("option", { value: a }))),
    h("label", {}, "From", h("input", { name: "from", type: "datetime-local" })),
    h("label", {}, "Until", h("input", { name: "to", type: "datetime-local" })),
    h("button", { type: "submit", id: "audit-apply" }, "Filter"));
  let query = "";
  let cursor = null;
  let generation = 0; // a page asked for before the filter changed is dropped
  // One page (50 entries, newest first) appended to the table.
  const load = async () => {
    const mine = generation;
    more.disabled = true; // one page at a time, or a page would be shown twice
    let page;
    try {
      page = await api("GET", `/audit?limit=50${query}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    } finally {
      more.disabled = false;
    }
    if (mine !== generation) return;
    for (const e of page.items) {
      const details = e.details && Object.keys(e.details).length ? JSON.stringify(e.details) : "";
      body.append(h("tr", { "data-seq": e.seq, "data-action": e.action },
        h("td", { title: e.at }, when(e.at)), h("td", {}, e.actor), h("td", {}, e.action), h("td", {}, e.target),
        h("td", { class: e.outcome === "ok" ? "" : "error" }, e.outcome), h("td", {}, e.client),
        h("td", { class: "details" }, details)));
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
    count.textContent = `${body.children.length} entries shown${cursor ? "" : ", no more"}`;
  };
  const shown = (p) => p.catch((e) => { err.textContent = formError(e, "Could not read the log"); });
  more.addEventListener("click", () => { err.textContent = ""; shown(load()); });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const f = new FormData(form);
    const q = new URLSearchParams();
    for (const k of ["actor", "action"]) if (f.get(k).trim()) q.set(k, f.get(k).trim());
    for (const k of ["from", "to"]) {
      if (!f.get(k)) continue;
      const iso = isoOf(f.get(k));
      if (!iso) {
        err.textContent = `The ${k === "from" ? "start" : "end"} time is not a date.`;
        return;
      }
      q.set(k, iso);
    }
    query = q.toString() ? `&${q}` : "";
    cursor = null;
    generation++;
    body.replaceChildren();
    shown(load());
  });
  await load(); // a 403 here is the page's error (report)
  show(h("h1", {}, "Audit log"), form, err,
    h("div", { class: "scroll" }, h("table", { id: "audit" },
      h("thead", {}, h("tr", {}, ["Time", "Actor", "Action", "Target", "Outcome", "Client", "Details"].map((c) => h("th", {}, c)))),
      body)),
    h("div", { class: "toolbar" }, more, count));
}
