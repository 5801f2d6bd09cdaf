// Drives the dashboard's administration pages and model actions in Debian's
// chromium (headless) for tests/integration/test_58_dashboard_admin.py, which
// prepares the platform and checks what this reports.
// Usage: node admin.mjs '<json args>'
//   args: {url, tenant, admin: [user, password], scientist: [user, password],
//          clinician: [user, password], template, new_user, mfa_user, model,
//          approve_version, reject_version, canary_share, download_dir,
//          screenshots: dir|null}
// Prints one JSON object of observations; exits 1 (with {"error": ...}) if
// a step cannot be carried out.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

// The test checks what is asked on stdout ("NEED disabled <user> <password>")
// and answers one line on stdin.
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(what) {
  console.log(`NEED ${what}`);
  const { value } = await lines.next();
  return String(value || "").trim();
}

const args = JSON.parse(process.argv[2]);
const out = { console_errors: [], failed_loads: [], api_errors: [], dialogs: [], steps: [] };
const step = (name) => out.steps.push(name);

async function shot(page, name) {
  if (args.screenshots) await page.screenshot({ path: `${args.screenshots}/${name}.png`, fullPage: true });
}

async function signIn(page, tenant, [user, password]) {
  await page.fill("input[name=tenant]", tenant);
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", password);
  await page.click("form#signin button[type=submit]");
}

async function signOut(page) {
  await page.click("#signout");
  await page.waitForSelector("form#signin");
}

// Runs act() and waits until the page has drawn `selector` anew: the old
// element is marked first, so the check cannot pass on what was already there.
async function redrawn(page, selector, act) {
  await page.$eval(selector, (el) => { el.dataset.stale = "1"; });
  await act();
  await page.waitForSelector(`${selector}:not([data-stale])`);
}

const navShown = (page) => page.evaluate(() => Object.fromEntries(
  ["nav-models", "nav-provisioning", "nav-users", "nav-audit"].map((id) => [id, !document.getElementById(id).hidden])));

const overflows = (page) => page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);

const rowRoles = (page, user) => page.$$eval(`tr[data-user="${user}"] input[name=role]:checked`,
  (els) => els.map((e) => e.value));

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  // As in dashboard.mjs: the API's non-2xx answers are reported apart
  // (api_errors), Chrome's "Failed to load resource" lines are not errors.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource"))
      out.console_errors.push(m.text());
  });
  page.on("response", (r) => {
    if (r.status() < 400) return;
    const u = new URL(r.url());
    (u.pathname.startsWith("/api/v1/") ? out.api_errors : out.failed_loads)
      .push(`${r.status()} ${u.pathname}`);
  });
  page.on("pageerror", (e) => out.console_errors.push(String(e)));
  // Every confirmation is accepted, and its question kept.
  page.on("dialog", (d) => { out.dialogs.push(d.message()); d.accept(); });

  await page.goto(args.url);
  await page.waitForSelector("form#signin");

  // ---- the administrator ----------------------------------------------------------
  await signIn(page, args.tenant, args.admin);
  await page.waitForSelector("table#fleet");
  out.admin_nav = await navShown(page);
  step("admin signed in");

  // Provisioning: a template created through the form is listed.
  await page.click("#nav-provisioning");
  await page.waitForSelector("form#template-form");
  await page.fill("#template-form input[name=name]", args.template);
  await page.fill("#template-form input[name=group]", "ward-7");
  await page.fill("#template-form input[name=device_prefix]", "w7");
  await page.fill("#template-form input[name=cert_days]", "400");
  await page.fill("#template-form textarea[name=serials]", "SN-001, SN-002\nSN-003");
  await page.click("#template-create");
  await page.waitForSelector(`tr[data-template="${args.template}"]`);
  out.template_row = await page.textContent(`tr[data-template="${args.template}"]`);
  step("template created");

  // The same name again: the API's 409, shown in the form.
  await page.fill("#template-form input[name=name]", args.template);
  await page.click("#template-create");
  await page.waitForFunction(() => document.getElementById("template-form-error")?.textContent.length > 0);
  out.template_conflict = await page.textContent("#template-form-error");
  step("template conflict");

  // A claim certificate, offered as a file; the key is nowhere in the page.
  await page.click(`tr[data-template="${args.template}"] button[data-action=claim-cert]`);
  await page.waitForSelector("#claim-download");
  out.claim_warning = await page.textContent("#claim-offer");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#claim-download")]);
  out.claim_filename = download.suggestedFilename();
  out.claim_path = `${args.download_dir}/claim.pem`;
  await download.saveAs(out.claim_path);
  out.claim_href = await page.getAttribute("#claim-download", "href");
  out.key_in_page = await page.evaluate(() => document.documentElement.outerHTML.includes("PRIVATE KEY") ||
    document.body.innerText.includes("PRIVATE KEY"));
  await shot(page, "provisioning");
  step("claim certificate");

  // Users: a clinician created, the generated password shown once.
  await page.click("#nav-users");
  await page.waitForSelector("form#user-form");
  await page.fill("#user-form input[name=username]", args.new_user);
  await page.check("#user-form input[name=role][value=clinician]");
  await page.click("#user-create");
  await page.waitForSelector("#user-secret");
  const secret = (await page.textContent("#user-secret")).trim();
  out.user_created_text = await page.textContent("#user-created");
  out.created_roles = await rowRoles(page, args.new_user);
  out.created_status = await page.textContent(`tr[data-user="${args.new_user}"] td[data-status]`);
  await shot(page, "users");
  step("user created");

  // Roles: clinician and data scientist.
  await page.check(`tr[data-user="${args.new_user}"] input[name=role][value=data_scientist]`);
  await redrawn(page, "table#users", () => page.click(`tr[data-user="${args.new_user}"] button[data-action=roles]`));
  out.secret_after_redraw = await page.$("#user-secret") !== null;
  out.changed_roles = await rowRoles(page, args.new_user);
  step("roles");

  // Disabled: the test checks the API and the user's sign-in, then enabled again.
  await redrawn(page, "table#users", () => page.click(`tr[data-user="${args.new_user}"] button[data-action=disable]`));
  out.disabled_status = await page.textContent(`tr[data-user="${args.new_user}"] td[data-status]`);
  out.disabled_check = await ask(`disabled ${args.new_user} ${secret}`);
  await redrawn(page, "table#users", () => page.click(`tr[data-user="${args.new_user}"] button[data-action=enable]`));
  out.enabled_status = await page.textContent(`tr[data-user="${args.new_user}"] td[data-status]`);
  out.new_user_secret = secret;
  step("disable and enable");

  // A lost phone: the second factor removed.
  const mfaCell = `tr[data-user="${args.mfa_user}"] td[data-mfa]`;
  out.mfa_before = await page.textContent(mfaCell);
  await redrawn(page, "table#users", () => page.click(`tr[data-user="${args.mfa_user}"] button[data-action=mfa-reset]`));
  out.mfa_after = await page.textContent(mfaCell);
  out.mfa_reset_buttons = await page.$$eval(`tr[data-user="${args.mfa_user}"] button[data-action=mfa-reset]`, (b) => b.length);
  step("second factor reset");

  // The audit log: a page of 50, more on demand, filters that narrow it.
  await page.click("#nav-audit");
  await page.waitForSelector("table#audit tbody tr");
  const auditRows = () => page.$$eval("table#audit tbody tr", (rows) => rows.map((r) => ({
    action: r.dataset.action, cells: [...r.children].map((c) => c.textContent) })));
  out.audit_first = (await auditRows()).length;
  out.audit_more_shown = await page.isVisible("#audit-more");
  await shot(page, "audit");
  await page.click("#audit-more");
  await page.waitForFunction((n) => document.querySelectorAll("table#audit tbody tr").length > n, out.audit_first);
  out.audit_after_more = (await auditRows()).length;
  out.audit_actions = [...new Set((await auditRows()).map((r) => r.action))];
  // The count is written once a page is in: emptied first, it tells when
  // the filtered page has arrived.
  const filterBy = async (fields) => {
    for (const [k, v] of Object.entries(fields)) await page.fill(`#audit-filter input[name=${k}]`, v);
    await page.$eval("#audit-count", (el) => { el.textContent = ""; });
    await page.click("#audit-apply");
    await page.waitForFunction(() => document.getElementById("audit-count").textContent.length > 0);
    return auditRows();
  };
  out.audit_user_create = await filterBy({ action: "user.create" });
  out.audit_future = await filterBy({ action: "user.create", from: "2099-01-01T00:00" });
  out.audit_actor = await filterBy({ action: "", from: "", actor: `user:${args.tenant}/${args.admin[0]}` });
  step("audit");

  // At tablet width the administration pages do not scroll sideways.
  await page.setViewportSize({ width: 800, height: 1100 });
  out.tablet_overflow = {};
  for (const [nav, ready] of [["nav-provisioning", "table#templates"], ["nav-users", "table#users"],
    ["nav-audit", "table#audit tbody tr"]]) {
    await page.click(`#${nav}`);
    await page.waitForSelector(ready);
    out.tablet_overflow[nav] = await overflows(page);
  }
  await page.setViewportSize({ width: 1280, height: 900 });
  step("tablet");
  await signOut(page);

  // ---- a data scientist: approve, reject, point the canary -----------------------
  await signIn(page, args.tenant, args.scientist);
  await page.waitForSelector("table#fleet");
  await page.click("#nav-models");
  const section = `section[data-model="${args.model}"]`;
  await page.waitForSelector(`${section} tr[data-version="${args.approve_version}"]`);
  out.pending_before = await page.$$eval(`${section} tr[data-status=pending]`, (rows) => rows.map((r) => r.dataset.version));
  await page.click(`${section} tr[data-version="${args.approve_version}"] button[data-action=approve]`);
  await page.waitForSelector(`${section} tr[data-version="${args.approve_version}"][data-status=approved]`);
  await page.click(`${section} tr[data-version="${args.reject_version}"] button[data-action=reject]`);
  await page.waitForSelector(`${section} tr[data-version="${args.reject_version}"][data-status=rejected]`);
  out.version_statuses = await page.$$eval(`${section} tr[data-version]`, (rows) =>
    Object.fromEntries(rows.map((r) => [r.dataset.version, r.dataset.status])));
  out.alias_versions = await page.$$eval(`${section} form.alias-form select[name=version] option`,
    (os) => os.map((o) => o.value));
  // The share is asked for the canary only.
  out.share_hidden_for_production = await page.$eval(`${section} form.alias-form input[name=share_pct]`,
    (i) => i.closest("label").hidden);
  await page.selectOption(`${section} form.alias-form select[name=alias]`, "canary");
  out.share_hidden_for_canary = await page.$eval(`${section} form.alias-form input[name=share_pct]`,
    (i) => i.closest("label").hidden);
  await page.selectOption(`${section} form.alias-form select[name=version]`, args.approve_version);
  await page.fill(`${section} form.alias-form input[name=share_pct]`, String(args.canary_share));
  await page.click(`${section} form.alias-form button[type=submit]`);
  await page.waitForSelector(`${section} li[data-alias=canary]`);
  out.canary_text = await page.textContent(`${section} li[data-alias=canary]`);
  step("approve, reject, canary");

  // The API refuses a rejected version (offered here by hand, as a stale
  // page would): the refusal is shown in the section, nothing thrown.
  await page.selectOption(`${section} form.alias-form select[name=alias]`, "production");
  await page.$eval(`${section} form.alias-form select[name=version]`, (s, v) => {
    s.append(new Option(v, v));
    s.value = v;
  }, args.reject_version);
  await page.click(`${section} form.alias-form button[type=submit]`);
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent.length > 0,
    `${section} [data-model-error]`);
  out.alias_refused = await page.textContent(`${section} [data-model-error]`);
  step("alias refused");
  await signOut(page);

  // ---- a clinician: no administration ----------------------------------------------
  await signIn(page, args.tenant, args.clinician);
  await page.waitForSelector("table#fleet");
  out.clinician_nav = await navShown(page);
  await page.click("#nav-models");
  await page.waitForSelector(`${section} tr[data-version]`);
  out.clinician_decision_buttons = await page.$$eval(`${section} button[data-action]`, (b) => b.length);
  out.clinician_alias_forms = await page.$$eval("form.alias-form", (f) => f.length);
  await page.evaluate(() => { location.hash = "#/users"; });
  await page.waitForSelector("#page-error");
  out.clinician_users_page = await page.textContent("#page-error");
  step("clinician");
  await context.close();
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(out.error ? 1 : 0);
