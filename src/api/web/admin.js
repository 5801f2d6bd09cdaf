// fleetml dashboard: administration pages (provisioning, users, audit).
import { h, show } from "./lib.js";

export async function provisioningPage() { show(h("h1", {}, "Provisioning")); }
export async function usersPage() { show(h("h1", {}, "Users")); }
export async function auditPage() { show(h("h1", {}, "Audit")); }
