import { EventEmitter } from "node:events";
import type http from "node:http";
import { Code, ConnectError } from "@connectrpc/connect";
import { BODY_BUDGET_EXHAUSTED, BodyBudget, errorInfoOf, isBodyBudgetRefusal, isBodyBudgetStop, metricsText, REQUEST_BODY_TIMEOUT, type Logger } from "@outpost/platform";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { afterEach, describe, expect, it } from "vitest";
import { silentLogger } from "./helpers.ts";

/** A request as the budget sees one: its headers and its client's address. */
function request(headers: Record<string, string> = {}, client = "10.0.0.1"): http.IncomingMessage {
  return { headers, socket: { remoteAddress: client } } as unknown as http.IncomingMessage;
}

/** A response that only closes. */
function response(): http.ServerResponse & EventEmitter {
  return new EventEmitter() as http.ServerResponse & EventEmitter;
}

const bytes = (n: number) => new Uint8Array(n);

/** The refusal `fn` throws. */
function refusalOf(fn: () => unknown): ConnectError {
  try {
    fn();
  } catch (err) {
    expect(isBodyBudgetRefusal(err)).toBe(true);
    return err as ConnectError;
  }
  throw new Error("expected a refusal");
}

const budgets: BodyBudget[] = [];
function budgetOf(limitBytes: number, perClientBytes?: number, logger: Logger = silentLogger, warnIntervalMs?: number): BodyBudget {
  const budget = new BodyBudget({ limitBytes, perClientBytes, largestBodyBytes: 1000, logger, warnIntervalMs, settings: { total: "TOTAL_SETTING" } });
  budgets.push(budget);
  return budget;
}
afterEach(() => {
  for (const b of budgets.splice(0)) b.close();
});

describe("BodyBudget", () => {
  it("charges a body without a declared size as its bytes come, and gives them back once", () => {
    const budget = budgetOf(10_000);
    const charge = budget.charge(request());
    charge.add(bytes(300));
    charge.add(bytes(200));
    expect([charge.bytes, budget.bufferedBytes, budget.bufferedBy("10.0.0.1")]).toEqual([500, 500, 500]);
    charge.release();
    charge.release();
    charge.add(bytes(100)); // nothing counts once given back
    expect([budget.bufferedBytes, budget.bufferedBy("10.0.0.1")]).toEqual([0, 0]);
  });

  it("reserves a declared content-length at once, up to the largest body, and charges what comes beyond it", () => {
    const budget = budgetOf(10_000);
    const declared = budget.charge(request({ "content-length": "800" }));
    expect(budget.bufferedBytes).toBe(800);
    declared.add(bytes(500));
    expect(budget.bufferedBytes).toBe(800);
    declared.add(bytes(400)); // more than it declared
    expect(budget.bufferedBytes).toBe(900);
    const huge = budget.charge(request({ "content-length": "50000" }));
    expect(huge.bytes).toBe(1000);
    const odd = budget.charge(request({ "content-length": "12x" }));
    expect(odd.bytes).toBe(0);
    declared.release();
    huge.release();
    odd.release();
    expect(budget.bufferedBytes).toBe(0);
  });

  it("reserves what the first envelope of a gRPC or Connect-stream body declares, its header split across chunks", () => {
    const budget = budgetOf(10_000);
    const charge = budget.charge(request({ "content-type": "application/grpc" }));
    charge.add(Uint8Array.from([0, 0, 0]));
    expect(charge.bytes).toBe(3);
    charge.add(Uint8Array.from([2, 0x58, 1, 2])); // length 0x258 = 600, and a first byte of it
    expect(charge.bytes).toBe(605);
    const stream = budget.charge(request({ "content-type": "application/connect+proto" }));
    stream.add(Uint8Array.from([0, 0, 0, 0, 10]));
    expect(stream.bytes).toBe(15);
    // gRPC-Web text is base64: its bytes are not an envelope.
    const text = budget.charge(request({ "content-type": "application/grpc-web-text" }));
    text.add(Uint8Array.from([0, 0, 0, 3, 0]));
    expect(text.bytes).toBe(5);
    expect(budget.bufferedBytes).toBe(625);
  });

  it("refuses the body that would take the total over, with ErrorInfo naming the budget and RetryInfo; the others keep theirs", () => {
    const budget = budgetOf(2000);
    const first = budget.charge(request({ "content-length": "900" }, "10.0.0.1"));
    const second = budget.charge(request({ "content-length": "900" }, "10.0.0.2"));
    const err = refusalOf(() => budget.charge(request({ "content-length": "300" }, "10.0.0.3")));
    expect(err.code).toBe(Code.ResourceExhausted);
    const info = errorInfoOf(err);
    expect(info?.reason).toBe(BODY_BUDGET_EXHAUSTED);
    expect(info?.metadata).toEqual({ budget: "total", setting: "TOTAL_SETTING", limit_bytes: "2000" });
    expect(err.findDetails(RetryInfoSchema)).toHaveLength(1);
    // Refused mid-body: what it held is given back.
    const third = budget.charge(request({}, "10.0.0.3"));
    third.add(bytes(150));
    expect(budget.bufferedBytes).toBe(1950);
    refusalOf(() => third.add(bytes(100)));
    expect([budget.bufferedBytes, budget.bufferedBy("10.0.0.3")]).toEqual([1800, 0]);
    // The admitted bodies finish within what they reserved.
    first.add(bytes(900));
    second.add(bytes(900));
    first.release();
    second.release();
    expect(budget.bufferedBytes).toBe(0);
    budget.charge(request({ "content-length": "1000" }, "10.0.0.3")).release();
  });

  it("gives each client at most its share, so another client still gets in", () => {
    const budget = budgetOf(3000, 1200);
    expect(budget.perClientBytes).toBe(1200);
    const a = budget.charge(request({ "content-length": "1000" }, "10.0.0.1"));
    const err = refusalOf(() => budget.charge(request({ "content-length": "300" }, "10.0.0.1")));
    expect(errorInfoOf(err)?.metadata).toEqual({ budget: "per_client_ip", setting: "per_client_ip", limit_bytes: "1200" });
    const b = budget.charge(request({ "content-length": "1000" }, "10.0.0.2"));
    expect([budget.bufferedBy("10.0.0.1"), budget.bufferedBy("10.0.0.2"), budget.bufferedBytes]).toEqual([1000, 1000, 2000]);
    a.release();
    b.release();
    // A share above the total is the total.
    expect(budgetOf(100, 500).perClientBytes).toBe(100);
  });

  it("gives a body's bytes back when its response closes (a reset stream, a closed connection)", () => {
    const budget = budgetOf(10_000);
    const res = response();
    const charge = budget.charge(request({ "content-length": "700" }), res);
    charge.add(bytes(100));
    expect(budget.bufferedBytes).toBe(700);
    res.emit("close");
    expect(budget.bufferedBytes).toBe(0);
    charge.release(); // the reader's own release after that changes nothing
    expect(budget.bufferedBytes).toBe(0);
    expect(res.listenerCount("close")).toBe(0);
    // Released first: its close listener is gone.
    const other = response();
    budget.charge(request({ "content-length": "10" }), other).release();
    expect(other.listenerCount("close")).toBe(0);
  });

  it("warns once while it refuses, then at most once an interval with the count since", async () => {
    const warnings: { fields: Record<string, unknown>; message: string }[] = [];
    const logger = { warn: (fields: Record<string, unknown>, message: string) => warnings.push({ fields, message }) } as unknown as Logger;
    const budget = budgetOf(500, undefined, logger, 200);
    const held = budget.charge(request({ "content-length": "500" }));
    for (let i = 0; i < 25; i++) refusalOf(() => budget.charge(request({ "content-length": "10" })));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.fields).toMatchObject({ budget: "total", limitBytes: 500, bufferedBytes: 500, refused: 1 });
    await new Promise((resolve) => setTimeout(resolve, 250));
    refusalOf(() => budget.charge(request({ "content-length": "10" })));
    expect(warnings).toHaveLength(2);
    expect(warnings[1]!.fields).toMatchObject({ refused: 25 });
    held.release();
  });

  it("reports the bytes held, the budget and the refusals in the process's metrics", async () => {
    const sample = (text: string, name: string) => Number(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m").exec(text)?.[1]);
    const budget = budgetOf(1500);
    const charge = budget.charge(request({ "content-length": "999" }));
    let text = (await metricsText()).body;
    expect(sample(text, "outpost_request_body_buffered_bytes")).toBe(999);
    expect(sample(text, "outpost_request_body_budget_bytes")).toBe(1500);
    const refusedBefore = Number(/^outpost_request_body_budget_refusals_total\{[^}]*budget="total"[^}]*\} (\S+)$/m.exec(text)?.[1] ?? 0);
    refusalOf(() => budget.charge(request({ "content-length": "600" }, "10.0.0.9")));
    charge.release();
    text = (await metricsText()).body;
    expect(sample(text, "outpost_request_body_buffered_bytes")).toBe(0);
    expect(Number(/^outpost_request_body_budget_refusals_total\{[^}]*budget="total"[^}]*\} (\S+)$/m.exec(text)?.[1])).toBe(refusedBefore + 1);
    // A closed budget no longer counts.
    budget.close();
    expect(sample((await metricsText()).body, "outpost_request_body_budget_bytes")).toBe(0);
  });

  it("gives a body's charge back at the hold limit and tells its reader, DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT naming the setting", async () => {
    const budget = new BodyBudget({ limitBytes: 10_000, largestBodyBytes: 1000, logger: silentLogger, holdLimitMs: 50, holdLimitSetting: "HOLD_SETTING" });
    budgets.push(budget);
    const stalled = budget.charge(request({ "content-length": "800" }));
    const finished = budget.charge(request({ "content-length": "100" }));
    expect(stalled.holdLimited).toBe(true);
    const told: ConnectError[] = [];
    stalled.onOverdue((err) => told.push(err));
    finished.onOverdue(() => told.push(new ConnectError("the finished body must not be told", Code.Internal)));
    finished.release(); // read whole in time
    expect(budget.bufferedBytes).toBe(800);
    await new Promise((resolve) => setTimeout(resolve, 120));
    expect(told.map((e) => [e.code, errorInfoOf(e)?.reason, errorInfoOf(e)?.metadata["setting"], errorInfoOf(e)?.metadata["limit_ms"]])).toEqual([
      [Code.DeadlineExceeded, REQUEST_BODY_TIMEOUT, "HOLD_SETTING", "50"],
    ]);
    expect(isBodyBudgetStop(told[0])).toBe(true);
    expect(budget.bufferedBytes).toBe(0);
    stalled.add(bytes(10)); // nothing counts once given back
    expect(budget.bufferedBytes).toBe(0);
    // Without a limit there is nothing to wait for.
    const unlimited = budgetOf(10_000).charge(request());
    expect(unlimited.holdLimited).toBe(false);
    unlimited.release();
  });

  it("is no refusal for other errors", () => {
    expect(isBodyBudgetRefusal(new ConnectError("too big", Code.ResourceExhausted))).toBe(false);
    expect(isBodyBudgetRefusal(new Error("x"))).toBe(false);
  });
});
