/**
 * grpc.health.v1 (SPEC D6). "" is the whole server; it reports SERVING only while the
 * service's readiness check (its real dependencies) passes and it is not shutting down.
 */
import { create } from "@bufbuild/protobuf";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status, HealthCheckResponseSchema } from "@outpost/proto/grpc/health/v1/health_pb.js";
import { outpostError } from "./errors.ts";
import { throwIfCallAborted } from "./streams.ts";
import { Code } from "@connectrpc/connect";

/** Returns null when ready, or the reason it is not. */
export type ReadinessCheck = () => Promise<string | null>;

export class HealthState {
  private draining = false;
  private lastReason: string | null = null;
  private readonly check: ReadinessCheck;
  /** Filled in as services register; "" stands for the whole server. */
  private readonly services: string[];

  constructor(check: ReadinessCheck, services: string[]) {
    this.check = check;
    this.services = services;
  }

  /** Called when shutdown starts: from then on, the server reports NOT_SERVING. */
  drain(): void {
    this.draining = true;
  }

  /** The reason the server is not ready, or null. */
  async notReadyReason(): Promise<string | null> {
    if (this.draining) return "shutting down";
    try {
      this.lastReason = await this.check();
    } catch (err) {
      this.lastReason = err instanceof Error ? err.message : String(err);
    }
    return this.lastReason;
  }

  async status(service: string): Promise<Status> {
    if (service !== "" && !this.services.includes(service)) return Status.SERVICE_UNKNOWN;
    return (await this.notReadyReason()) === null ? Status.SERVING : Status.NOT_SERVING;
  }
}

const WATCH_INTERVAL_MS = 1000;

/** `drain` fires when the server shuts down: Watch streams then report NOT_SERVING and end. */
export function registerHealth(router: ConnectRouter, health: HealthState, drain?: AbortSignal): void {
  router.service(Health, {
    async check(req) {
      const status = await health.status(req.service);
      if (status === Status.SERVICE_UNKNOWN) {
        throw outpostError(Code.NotFound, "SERVICE_UNKNOWN", `unknown service "${req.service}"`);
      }
      return create(HealthCheckResponseSchema, { status });
    },
    async *watch(req, ctx: HandlerContext) {
      const signal = drain ? AbortSignal.any([ctx.signal, drain]) : ctx.signal;
      let last: Status | undefined;
      for (;;) {
        const status = await health.status(req.service);
        if (status !== last) {
          last = status;
          yield create(HealthCheckResponseSchema, { status });
        }
        if (signal.aborted) {
          throwIfCallAborted(ctx);
          return;
        }
        await new Promise<void>((resolve) => {
          const timer = setTimeout(done, WATCH_INTERVAL_MS).unref();
          function done() {
            clearTimeout(timer);
            signal.removeEventListener("abort", done);
            resolve();
          }
          signal.addEventListener("abort", done, { once: true });
        });
      }
    },
  });
}
