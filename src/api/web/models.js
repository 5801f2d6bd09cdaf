// fleetml dashboard: the models page (registry versions, aliases, drift).
import { api, h, show, when } from "./lib.js";

// ---- models -----------------------------------------------------------------------

// Read-only: the served models, each with its registered versions (status,
// who decided, validation metrics), the tenant's aliases (production, canary,
// shadow) and today's drift per version.
export async function modelsPage() {
  const served = await api("GET", "/models");
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
    sections.push(h("section", { class: "card", "data-model": m.name },
      h("h2", {}, `${m.name} (serving ${m.version})`),
      h("p", { class: "range" }, `Outputs: ${(m.outputs || []).map((o) => `${o.name} [${o.unit}] ${o.min}–${o.max}`).join("; ")}`),
      h("h3", {}, "Versions"),
      (versions.items || []).length
        ? h("table", { class: "versions" },
          h("thead", {}, h("tr", {}, ["Version", "Status", "Uploaded by", "Uploaded", "Metrics"].map((c) => h("th", {}, c)))),
          h("tbody", {}, versions.items.map((v) => h("tr", { "data-version": v.version },
            h("td", {}, v.version), h("td", {}, v.status), h("td", {}, v.created_by),
            h("td", {}, when(v.created_at)), h("td", {}, metrics(v))))))
        : h("p", { class: "range" }, "No registered versions: the bundled model serves."),
      h("h3", {}, "Aliases"),
      (aliases.items || []).length
        ? h("ul", {}, aliases.items.map((a) => h("li", {},
          `${a.alias} → ${a.version}${a.share_pct !== undefined && a.alias === "canary" ? ` (${a.share_pct} %)` : ""} by ${a.updated_by}`)))
        : h("p", { class: "range" }, "No aliases."),
      h("h3", {}, `Drift ${drift ? drift.day : ""}`),
      drift && drift.items && drift.items.length
        ? h("ul", {}, drift.items.map((d) => h("li", { class: d.alert ? "error" : "" },
          `${d.model}: ${d.measurements} measurements, largest PSI ${d.psi_max === null || d.psi_max === undefined ? "n/a" : d.psi_max.toFixed(3)}` +
          `${d.worst_feature ? ` (${d.worst_feature})` : ""}${d.alert ? " — drift alert" : ""}`)))
        : h("p", { class: "range" }, "No measurements scored today.")));
  }
  show(h("h1", {}, "Models"), ...sections);
}

