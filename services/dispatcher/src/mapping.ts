/** Conversions between the stored dispatch and its wire form. */
import { create, type JsonObject } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Dispatch, Dispatch_State, DispatchSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { DispatchRecord, DispatchState } from "./store/store.ts";

export function stateToProto(state: DispatchState): Dispatch_State {
  return Dispatch_State[state];
}

export function stateFromProto(state: Dispatch_State): DispatchState | undefined {
  return state === Dispatch_State.UNSPECIFIED ? undefined : (Dispatch_State[state] as DispatchState);
}

export function dispatchToProto(record: DispatchRecord): Dispatch {
  const ts = (ms: number | null) => (ms === null ? undefined : timestampFromMs(ms));
  return create(DispatchSchema, {
    id: record.id,
    tenantId: record.tenantId,
    agent: record.agent,
    task: record.task,
    repo: record.repoUrl ? { url: record.repoUrl, ref: record.repoRef } : undefined,
    model: record.model,
    modelTier: record.modelTier,
    timeout: durationFromMs(record.timeoutMs),
    secretNames: record.secretNames,
    env: record.env,
    labels: record.labels,
    requestId: record.requestId,
    state: stateToProto(record.state),
    attempt: record.attempt,
    exitCode: record.exitCode ?? undefined,
    failureReason: record.failureReason,
    result: record.resultJson === null ? undefined : (JSON.parse(record.resultJson) as JsonObject),
    executorId: record.executorId,
    createTime: ts(record.createTime),
    startTime: ts(record.startTime),
    endTime: ts(record.endTime),
    updateTime: ts(record.updateTime),
  });
}
