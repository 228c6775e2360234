/** What the tenant service's audit events say about a call (adapters/audit-reporter.ts). */
import { describe, expect, it } from "vitest";
import { auditedMutation } from "../src/adapters/audit-reporter.ts";

describe("audit targets", () => {
  it("names a secret by a valid name only: a refused name, which may be the value itself, is not written to the trail", () => {
    for (const method of ["outpost.tenant.v1.SecretService/PutSecret", "outpost.tenant.v1.SecretService/DeleteSecret"]) {
      expect(auditedMutation(method, { name: "GITHUB_TOKEN", value: "ghp_real" }, undefined)?.target).toBe("secret/GITHUB_TOKEN");
      // The arguments swapped: the token in the name, refused as INVALID_ARGUMENT, still audited.
      const swapped = auditedMutation(method, { name: "ghp_16C7e42F292c6912E7710c838347Ae178B4a", value: "GITHUB_TOKEN" }, undefined);
      expect(swapped?.target).toBe("secret/(invalid name)");
      expect(JSON.stringify(swapped)).not.toContain("ghp_16C7");
    }
  });

  it("records no event for reads", () => {
    expect(auditedMutation("outpost.tenant.v1.SecretService/ListSecrets", {}, undefined)).toBeUndefined();
  });
});
