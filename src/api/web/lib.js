// fleetml dashboard, shared parts: the API client (tokens, renewal), the
// session, and DOM helpers. Every page module imports these.
//
// Security: every value reaches the page through textContent or attributes set
// from the DOM API (never innerHTML), tokens travel in the Authorization header
// (never cookies, so no CSRF), and the Content-Security-Policy admits only this
// origin's scripts and styles.

export const API = "/api/v1";
const $app = document.getElementById("app");

// ---- session ----------------------------------------------------------------------

// Kept for this tab only (sessionStorage): closing the tab signs out.
export let session = JSON.parse(sessionStorage.getItem("fleetml.session") || "null");

export function saveSession(s) {
  session = s;
  if (s) sessionStorage.setItem("fleetml.session", JSON.stringify(s));
  else sessionStorage.removeItem("fleetml.session");
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

export async function call(method, path, body, token) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store",
  });
  const text = await r.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch (_) { doc = null; }
  if (!r.ok) {
    const e = (doc && doc.error) || {};
    throw new ApiError(r.status, e.code, e.message);
  }
  return doc;
}

// Renews the access token with the refresh token once (they rotate on use).
let refreshing = null;
export async function renew() {
  if (!session || !session.refresh) throw new ApiError(401, "unauthorized");
  if (!refreshing) {
    refreshing = call("POST", "/auth/refresh", { refresh_token: session.refresh })
      .then((t) => saveSession({ ...session, access: t.access_token, refresh: t.refresh_token }))
      .finally(() => { refreshing = null; });
  }
  return refreshing;
}

export async function api(method, path, body) {
  if (!session) throw new ApiError(401, "unauthorized");
  try {
    return await call(method, path, body, session.access);
  } catch (e) {
    if (e.status !== 401) throw e;
    try {
      await renew();
    } catch (_) {
      signedOut("Your session has ended; please sign in again.");
      throw e;
    }
    return call(method, path, body, session.access);
  }
}

// The router (app.js) registers how to draw the page after signing out.
let rerender = () => {};
export function onSignedOut(fn) { rerender = fn; }

export function signedOut(message) {
  saveSession(null);
  location.hash = "#/";
  rerender(message);
}

// ---- DOM helpers ------------------------------------------------------------------

// h("td", {class: "x"}, "text", node...): strings become text nodes, never markup.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = String(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function show(...nodes) {
  $app.replaceChildren(...nodes.filter(Boolean));
}

export function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function hasAny(roles) {
  return !!(session && session.roles && session.roles.some((r) => roles.includes(r)));
}

// A failed page load: a message in place of the page.
export function report(e) {
  if (e && e.status === 401) return;
  const msg = e && e.status === 403 ? "You are not allowed to see this."
    : e && e.status === 404 ? "Not found." : `Something went wrong: ${e && e.message}`;
  show(h("p", { class: "error", role: "alert", id: "page-error" }, msg), h("a", { href: "#/" }, "Back to the fleet"));
}

// Asks, then does; false when the user said no. Every action that changes or
// removes something goes through here.
export function confirmed(question) {
  return window.confirm(question);
}

// A small form whose submit handler shows its error in the form itself:
// errorText(e) maps an API error to the message (403 by default: not allowed).
export function formError(e, what) {
  if (e && e.status === 403) return "You are not allowed to do this.";
  return `${what}: ${e && e.message}`;
}
