/**
 * LeaseClient over the dispatcher's LeaseService (gRPC, signed executor identity). A lease
 * the dispatcher no longer recognises (FAILED_PRECONDITION, or NOT_FOUND for a run it does not
 * know) becomes LeaseLostError, which the core handles by stopping without reporting.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { internalClient, type SigningKeys, type TlsFiles } from "@outpost/platform";
import { LeaseService, ReportRunStateRequestSchema } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LeaseLostError, NotSupportedError, ReportRefusedError, type CapacityReport, type LeaseClient } from "../core/ports.ts";

/** Contract C calls may not be served yet by the dispatcher this executor talks to. */
function notSupported(err: unknown, method: string): unknown {
  return ConnectError.from(err).code === Code.Unimplemented ? new NotSupportedError(`dispatcher does not implement ${method}`, { cause: err }) : err;
}

function capacityMessage(capacity: CapacityReport | undefined) {
  return capacity
    ? {
        slotsTotal: capacity.slotsTotal,
        slotsBusy: capacity.slotsBusy,
        warmContainers: capacity.warmContainers,
        engineReady: capacity.engineReady,
        imagesPresent: capacity.imagesPresent,
      }
    : undefined;
}

export interface LeaseClientOptions {
  dispatcherUrl: string;
  signingKeys: SigningKeys;
  /** Internal TLS for an https:// URL (internalTlsOf). */
  tls?: TlsFiles | undefined;
  executorId: string;
  /** Deadline of unary calls other than the long poll. */
  callTimeoutMs?: number;
}

export function createLeaseClient(options: LeaseClientOptions): LeaseClient {
  const client: Client<typeof LeaseService> = internalClient(LeaseService, {
    baseUrl: options.dispatcherUrl,
    signingKeys: options.signingKeys,
    tls: options.tls,
    identity: { kind: "service", principal: `executor/${options.executorId}` },
  });
  const timeoutMs = options.callTimeoutMs ?? 10_000;
  const leaseLost = (err: unknown): unknown => {
    const connectErr = ConnectError.from(err);
    return connectErr.code === Code.FailedPrecondition || connectErr.code === Code.NotFound
      ? new LeaseLostError(connectErr.rawMessage, { cause: err })
      : err;
  };
  return {
    async acquire(executorId, waitMs, signal, capacity) {
      const res = await client.acquireLease(
        { executorId, wait: durationFromMs(waitMs), capacity: capacityMessage(capacity) },
        // The server answers within `wait`; the extra time covers the network and a busy server.
        { signal, timeoutMs: waitMs + 15_000 },
      );
      return res.lease;
    },
    async heartbeat(dispatchId, leaseId, capacity) {
      try {
        const res = await client.heartbeat(
          { dispatchId, leaseId, executorId: options.executorId, capacity: capacityMessage(capacity) },
          { timeoutMs },
        );
        return { expireTime: res.expireTime ? timestampDate(res.expireTime) : undefined, cancelRequested: res.cancelRequested, logGrant: res.logGrant };
      } catch (err) {
        throw leaseLost(err);
      }
    },
    async report(report) {
      try {
        await client.reportRunState(
          create(ReportRunStateRequestSchema, {
            dispatchId: report.dispatchId,
            leaseId: report.leaseId,
            state: report.state,
            exitCode: report.exitCode,
            // The dispatcher takes at most 4,096 characters (a schema's complaint can be longer).
            failureReason: truncate(report.failureReason ?? "", MAX_REASON_CHARS),
            lastLogSeq: BigInt(report.lastLogSeq),
            ...(report.result ? { result: report.result } : {}),
          }),
          { timeoutMs },
        );
      } catch (err) {
        const code = ConnectError.from(err).code;
        if (code === Code.InvalidArgument || code === Code.ResourceExhausted) throw new ReportRefusedError(ConnectError.from(err).rawMessage, { cause: err });
        throw leaseLost(err);
      }
    },
    async release(dispatchId, leaseId, reason, infrastructureFailure, runtimeFailure = false) {
      try {
        await client.releaseLease({ dispatchId, leaseId, reason: reason.slice(0, 4000), infrastructureFailure, runtimeFailure }, { timeoutMs });
      } catch (err) {
        throw leaseLost(notSupported(err, "ReleaseLease"));
      }
    },
    async *watchCancellations(executorId, signal) {
      try {
        for await (const res of client.watchCancellations({ executorId }, { signal })) {
          yield { dispatchId: res.dispatchId, leaseId: res.leaseId };
        }
      } catch (err) {
        if (signal.aborted) return;
        throw notSupported(err, "WatchCancellations");
      }
    },
    async listLeases(executorId) {
      try {
        return (await client.listExecutorLeases({ executorId }, { timeoutMs })).leases;
      } catch (err) {
        throw notSupported(err, "ListExecutorLeases");
      }
    },
  };
}

const MAX_REASON_CHARS = 4000;

function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}
