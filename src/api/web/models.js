// fleetml dashboard: the models page (registry versions, aliases, drift).
import { api, confirmed, formError, h, hasAny, show, when } from "./lib.js";

// ---- models -----------------------------------------------------------------------

// Roles with models.approve and models.deploy (docs/openapi.yaml): only they
// see the controls; the API decides either way.
const DECIDERS = ["admin", "data_scientist", "operator"];
const ALIASES = ["production", "canary", "shadow"];

// Approve or reject a pending version, asked first.
async function decide(name, version, what, err) {
  const q = what === "approve"
    ? `Approve ${name} version ${version}? It can then be deployed.`
    : `Reject ${name} version ${version}? It can then never be deployed.`;
  if (!confirmed(q)) return;
  err.textContent = "";
  try {
    await api("POST", `/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/${what}`, {});
  } catch (e) {
    err.textContent = formError(e, what === "approve" ? "Not approved" : "Not rejected");
    return;
  }
  await redraw(err);
}

// Points one of the tenant's aliases at an approved version (or removes it);
// the canary takes a share of the devices, in percent.
function aliasForm(name, versions, err) {
  const approved = versions.filter((v) => v.status === "approved");
  const alias = h("select", { name: "alias", "aria-label": "Alias" }, ALIASES.map((a) => h("option", { value: a }, a)));
  const version = h("select", { name: "version", "aria-label": "Version" },
    approved.map((v) => h("option", { value: v.version }, v.version)),
    h("option", { value: "" }, "none (remove the alias)"));
  const share = h("input", { name: "share_pct", type: "number", min: 1, max: 100, value: 10, required: true });
  const shareLabel = h("label", {}, "Canary share (%)", share);
  const canaryOnly = () => {
    shareLabel.hidden = share.disabled = alias.value !== "canary";
  };
  alias.addEventListener("change", canaryOnly);
  canaryOnly();
  const form = h("form", { class: "toolbar filters alias-form", "data-alias-form": name },
    h("label", {}, "Alias", alias), h("label", {}, "Version", version), shareLabel,
    h("button", { type: "submit" }, "Point alias"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const body = { version: version.value || null };
    const canary = alias.value === "canary" && body.version;
    if (canary) body.share_pct = Number(share.value);
    const q = body.version
      ? `Point ${alias.value} of ${name} at version ${body.version}${canary ? ` for ${body.share_pct} % of the devices` : ""}?`
      : `Remove the ${alias.value} alias of ${name}?`;
    if (!confirmed(q)) return;
    try {
      await api("PUT", `/models/${encodeURIComponent(name)}/aliases/${alias.value}`, body);
    } catch (e) {
      err.textContent = formError(e, "Not changed");
      return;
    }
    await redraw(err);
  });
  return form;
}

// After an action: the page again, or the error beside the controls if the
// page cannot be read any more.
async function redraw(err) {
  try {
    await modelsPage();
  } catch (e) {
    err.textContent = formError(e, "Could not reload the page");
  }
}

// The served models, each with its registered versions (status, who decided,
// validation metrics), the tenant's aliases (production, canary, shadow) and
// today's drift per version; approvals and aliases for those who may.
export async function modelsPage() {
  const served = await api("GET", "/models");
  const decider = hasAny(DECIDERS);
  const sections = [];
  for (const m of served.items || []) {
    const enc = encodeURIComponent(m.name);
    const [versions, aliases, drift] = await Promise.all([
      api("GET", `/models/${enc}/versions?limit=100`).catch(() => ({ items: [] })),
      api("GET", `/models/${enc}/aliases`).catch(() => ({ items: [] })),
      api("GET", `/models/${enc}/drift`).catch(() => null),
    ]);
    const metrics = (v) => {
      const val = v.manifest && v.manifest.metrics;
      return val ? Object.entries(val).filter(([, x]) => typeof x === "number")
        .map(([k, x]) => `${k} ${x.toFixed(3)}`).join(", ") : "";
    };
    const err = h("p", { class: "error", role: "alert", "data-model-error": m.name });
    const decision = (v) => {
      if (v.status === "pending" && decider)
        return h("div", { class: "actions" },
          h("button", { type: "button", "data-action": "approve", onclick: () => decide(m.name, v.version, "approve", err) }, "Approve"),
          h("button", { type: "button", class: "danger", "data-action": "reject", onclick: () => decide(m.name, v.version, "reject", err) }, "Reject"));
      return v.decision ? `${v.decision.by || ""}${v.decision.at ? `, ${when(v.decision.at)}` : ""}` : "";
    };
    sections.push(h("section", { class: "card", "data-model": m.name },
      h("h2", {}, `${m.name} (serving ${m.version})`),
      h("p", { class: "range" }, `Outputs: ${(m.outputs || []).map((o) => `${o.name} [${o.unit}] ${o.min}–${o.max}`).join("; ")}`),
      err,
      h("h3", {}, "Versions"),
      (versions.items || []).length
        ? h("div", { class: "scroll" }, h("table", { class: "versions" },
          h("thead", {}, h("tr", {}, ["Version", "Status", "Uploaded by", "Uploaded", "Metrics", "Decided"].map((c) => h("th", {}, c)))),
          h("tbody", {}, versions.items.map((v) => h("tr", { "data-version": v.version, "data-status": v.status },
            h("td", {}, v.version), h("td", { class: "status" }, v.status), h("td", {}, v.created_by),
            h("td", {}, when(v.created_at)), h("td", {}, metrics(v)), h("td", {}, decision(v)))))))
        : h("p", { class: "range" }, "No registered versions: the bundled model serves."),
      h("h3", {}, "Aliases"),
      (aliases.items || []).length
        ? h("ul", {}, aliases.items.map((a) => h("li", { "data-alias": a.alias },
          `${a.alias} → ${a.version}${a.share_pct !== undefined && a.alias === "canary" ? ` (${a.share_pct} %)` : ""} by ${a.updated_by}`)))
        : h("p", { class: "range" }, "No aliases."),
      decider ? aliasForm(m.name, versions.items || [], err) : null,
      h("h3", {}, `Drift ${drift ? drift.day : ""}`),
      drift && drift.items && drift.items.length
        ? h("ul", {}, drift.items.map((d) => h("li", { class: d.alert ? "error" : "" },
          `${d.model}: ${d.measurements} measurements, largest PSI ${d.psi_max === null || d.psi_max === undefined ? "n/a" : d.psi_max.toFixed(3)}` +
          `${d.worst_feature ? ` (${d.worst_feature})` : ""}${d.alert ? " — drift alert" : ""}`)))
        : h("p", { class: "range" }, "No measurements scored today.")));
  }
  show(h("h1", {}, "Models"), ...sections);
}
