// Drives the dashboard in Debian's chromium (headless) for
// tests/integration/test_57_dashboard.py, which prepares the platform and
// checks what this reports. Usage: node dashboard.mjs '<json args>'
//   args: {url, tenant, other_tenant, manager: [user, password],
//          other_clinician: [user, password], mfa_user: [user, password],
//          device, screenshots: dir|null}
// Prints one JSON object of observations; exits 1 (with {"error": ...}) if
// a step cannot be carried out.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

// The test does what is asked on stdout ("NEED measurement|connect|
// disconnect|otp") and answers one line on stdin (the measurement's id, the
// one-time code, ...).
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(what) {
  console.log(`NEED ${what}`);
  const { value } = await lines.next();
  return String(value || "").trim();
}

const args = JSON.parse(process.argv[2]);
const out = { console_errors: [], failed_loads: [], api_errors: [], steps: [] };
const step = (name) => out.steps.push(name);

async function shot(page, name) {
  if (args.screenshots) await page.screenshot({ path: `${args.screenshots}/${name}.png`, fullPage: true });
}

async function signIn(page, tenant, [user, password], otp) {
  await page.fill("input[name=tenant]", tenant);
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", password);
  if (otp) await page.fill("input[name=otp]", otp);
  await page.click("form#signin button[type=submit]");
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  // Chrome logs every non-2xx answer as a console error ("Failed to load
  // resource"); the API's 401/403/404 answers are expected and handled by the
  // page, so they are reported apart (api_errors), as are any other failed loads.
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
  page.on("dialog", (d) => d.accept());

  const resp = await page.goto(args.url);
  out.status = resp.status();
  out.csp = resp.headers()["content-security-policy"] || null;
  await page.waitForSelector("form#signin");
  step("sign-in page");
  await shot(page, "signin");

  // A wrong password: a message, still on the sign-in form.
  await signIn(page, args.tenant, [args.manager[0], "not-the-password-123"]);
  await page.waitForFunction(() => document.getElementById("signin-error").textContent.length > 0);
  out.wrong_password_message = await page.textContent("#signin-error");
  step("wrong password");

  // The device manager signs in and sees the fleet.
  await signIn(page, args.tenant, args.manager);
  await page.waitForSelector("table#fleet");
  out.fleet_devices = await page.$$eval("table#fleet tbody tr", (rows) => rows.map((r) => r.dataset.device));
  out.fleet_cert = await page.$eval(`tr[data-device="${args.device}"] td:nth-child(6)`, (td) => td.textContent);
  step("fleet");

  // Presence, pushed: the device connects, then leaves, while the page is open.
  const presence = `td[data-presence="${args.device}"]`;
  // The device left at the end of the set-up: offline (its report may land
  // after the page opened, and is then pushed too).
  await page.waitForFunction(() => document.getElementById("live")?.textContent === "live");
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "offline", presence, { timeout: 15000 });
  out.presence_seen = [await page.textContent(presence)];
  await ask("connect");
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "online", presence, { timeout: 15000 });
  out.presence_seen.push(await page.textContent(presence));
  await shot(page, "fleet");
  await ask("disconnect");
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "offline", presence, { timeout: 15000 });
  out.presence_seen.push(await page.textContent(presence));
  step("presence");

  // Session renewal: the access token is no longer accepted (here: spoilt),
  // the page renews it with the refresh token and carries on.
  const before_renewal = await page.evaluate(() => {
    const s = JSON.parse(sessionStorage.getItem("fleetml.session"));
    const old = s.refresh;
    s.access = "spoilt";
    sessionStorage.setItem("fleetml.session", JSON.stringify(s));
    return old;
  });
  await page.reload();
  await page.waitForSelector("table#fleet");
  await page.waitForFunction(() => document.getElementById("live")?.textContent === "live");
  out.renewed = await page.evaluate((old) => {
    const s = JSON.parse(sessionStorage.getItem("fleetml.session"));
    return s.access !== "spoilt" && s.refresh !== old;
  }, before_renewal);
  step("renewal");

  // The device page: the sweep plotted, the result with units and ranges.
  await page.click(`a[href="#/devices/${args.device}"]`);
  await page.waitForSelector("#plot canvas");
  await page.waitForSelector("[data-output=hematocrit_pct]");
  out.plot_pixels = await page.$eval("#plot canvas", (c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) n++;
    return n;
  });
  out.outputs = await page.$$eval("[data-output]", (els) => els.map((e) => [e.dataset.output, e.textContent]));
  out.firmware_texts = await page.$$eval(".firmware", (els) => els.map((e) => e.textContent));
  out.script_elements = await page.$$eval("script", (els) => els.map((e) => e.getAttribute("src")));
  out.measurement_rows = await page.$$eval("table#measurements tbody tr", (rows) => rows.map((r) => r.dataset.measurement));
  step("device page");
  await shot(page, "device");

  // Live: a measurement sent now appears on top, plotted, without a reload.
  await page.waitForFunction(() => document.getElementById("live")?.textContent === "live");
  const before = Date.now();
  const mid = await ask("measurement");
  await page.waitForSelector(`table#measurements tbody tr[data-measurement="${mid}"]`, { timeout: 15000 });
  await page.waitForFunction((id) => document.querySelector("#plot .u-title")?.textContent === `Sweep ${id}`, mid);
  out.live_ms = Date.now() - before;
  out.live_first_row = await page.$eval("table#measurements tbody tr", (r) => r.dataset.measurement);
  out.live_measurement = mid;
  step("live");
  await shot(page, "device");

  // A clinician's label: the lab's hematocrit for the shown measurement.
  await page.fill("#label-hct", "41.5");
  await page.click("#label-save");
  await page.waitForFunction(() => document.getElementById("label")?.textContent.includes("41.5"));
  out.label_text = await page.textContent("#label");
  out.labelled_measurement = await page.$eval("table#measurements tr.selected", (r) => r.dataset.measurement);
  step("label");

  // A correction: the new value is the label, the earlier one its history.
  await page.fill("#label-hct", "42");
  await page.click("#label-save");
  await page.waitForFunction(() => document.getElementById("label")?.textContent.includes("42 "));
  await page.waitForSelector("#label-history li[data-label-at]");
  out.corrected_label_text = await page.textContent("#label");
  out.label_history = await page.$$eval("#label-history li[data-label-at]", (els) => els.map((e) => e.textContent));
  step("label correction");
  await shot(page, "label");

  // The shadow's desired state, changed with a merge patch (bad JSON first).
  await page.fill("#desired-patch", "{not json");
  await page.click("#desired-save");
  await page.waitForFunction(() => document.getElementById("desired-error")?.textContent.length > 0);
  out.desired_bad_json = await page.textContent("#desired-error");
  await page.fill("#desired-patch", '{"sample_interval_s": 30}');
  await page.click("#desired-save");
  await page.waitForFunction(() => document.getElementById("shadow")?.textContent.includes("sample_interval_s"));
  out.shadow_text = await page.textContent("#shadow");
  step("shadow");

  // Disable it (confirmed in the dialog): the page shows the new status.
  await page.click("#disable");
  await page.waitForFunction(() => document.getElementById("device-status")?.textContent === "disabled");
  out.status_after_disable = await page.textContent("#device-status");
  step("disable");

  // The models page: the served model, its outputs, versions and drift.
  await page.click("#nav-models");
  await page.waitForSelector("section[data-model=viscosity]");
  out.models_text = await page.textContent("section[data-model=viscosity]");
  step("models");
  await shot(page, "models");

  // Sign out; a clinician of another hospital cannot see this device.
  await page.click("#signout");
  await page.waitForSelector("form#signin");
  await signIn(page, args.other_tenant, args.other_clinician);
  await page.waitForSelector("table#fleet");
  out.other_fleet_devices = await page.$$eval("table#fleet tbody tr", (rows) => rows.map((r) => r.dataset.device));
  await page.goto(`${args.url}#/devices/${args.device}`);
  await page.reload();
  await page.waitForSelector("#page-error");
  out.other_device_page = await page.textContent("#page-error");
  step("other tenant");

  // At tablet width the device page still lays out (no horizontal scroll).
  await page.setViewportSize({ width: 800, height: 1100 });
  out.tablet_overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  step("tablet");

  // A user with a second factor: asked for the code, then signed in.
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.click("#signout");
  await page.waitForSelector("form#signin");
  await signIn(page, args.tenant, args.mfa_user);
  await page.waitForSelector("input[name=otp]:visible");
  out.mfa_prompt = await page.textContent("#signin-error");
  await page.fill("input[name=otp]", await ask("otp"));
  await page.click("form#signin button[type=submit]");
  await page.waitForSelector("table#fleet");
  out.mfa_signed_in = await page.textContent("#who");
  step("second factor");
  await context.close();
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(out.error ? 1 : 0);
