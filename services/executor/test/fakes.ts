/** Fakes of the executor core's ports, for unit tests without Docker or a network. */
import { pino } from "pino";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import type {
  ContainerSummary,
  RunFiles,
  Workspaces,
  ContainerExit,
  ContainerRuntime,
  ContainerSpec,
  HeartbeatAnswer,
  LeaseClient,
  LogConnection,
  LogConnectionHandlers,
  LogLine,
  LogSink,
  OutputFrame,
  RunStateReport,
} from "../src/core/ports.ts";
import { CheckoutError, ImageNotFoundError, NotSupportedError, ReportRefusedError } from "../src/core/ports.ts";
import { sleep } from "../src/core/backoff.ts";
import type { RunClaim } from "../src/core/run.ts";
import { PushQueue } from "../src/adapters/push-queue.ts";

export const silentLogger = pino({ level: "silent" });

/** A log sink whose connections the test drives: it sees every batch and acks by hand. */
export class FakeSink implements LogSink {
  readonly connections: FakeConnection[] = [];
  /** The run each connection was opened for, in order. */
  readonly runs: Parameters<LogSink["open"]>[0][] = [];
  /** Ack every batch at once. */
  autoAck = false;
  /** What telemetry holds per run before this sink's lines: an empty batch is acked with it (autoAck). */
  readonly stored = new Map<string, number>();

  open(run: Parameters<LogSink["open"]>[0], handlers: LogConnectionHandlers): LogConnection {
    this.runs.push(run);
    const conn = new FakeConnection(handlers, this, run.dispatchId);
    this.connections.push(conn);
    return conn;
  }

  get last(): FakeConnection {
    return this.connections[this.connections.length - 1]!;
  }

  /** Every line sent on any connection, in order of sending. */
  get allSent(): LogLine[] {
    return this.connections.flatMap((c) => c.batches.flat());
  }
}

export class FakeConnection implements LogConnection {
  readonly batches: LogLine[][] = [];
  closed = false;
  readonly handlers: LogConnectionHandlers;
  private readonly sink: FakeSink;
  private readonly dispatchId: string;

  constructor(handlers: LogConnectionHandlers, sink: FakeSink, dispatchId: string) {
    this.handlers = handlers;
    this.sink = sink;
    this.dispatchId = dispatchId;
  }

  /** Empty batches sent: asks where the run's stored output stands (LogShipper continueStored). */
  get probes(): number {
    return this.batches.filter((batch) => batch.length === 0).length;
  }

  send(lines: LogLine[]): void {
    this.batches.push(lines);
    const acked = lines.length === 0 ? (this.sink.stored.get(this.dispatchId) ?? 0) : lines[lines.length - 1]!.seq;
    if (this.sink.autoAck) queueMicrotask(() => this.handlers.onAck(acked));
  }

  close(): void {
    this.closed = true;
  }

  ack(seq: number): void {
    this.handlers.onAck(seq);
  }

  fail(err = new Error("stream broke")): void {
    this.handlers.onClose(err);
  }
}

/** A container that writes the given frames, then exits with `exitCode` (or when stopped). */
export class FakeRuntime implements ContainerRuntime {
  pingError: Error | undefined;
  imageMissing = false;
  frames: OutputFrame[] = [];
  exitCode = 0;
  oomKilled = false;
  /** Keeps running until stopped. */
  runForever = false;
  readonly created: ContainerSpec[] = [];
  readonly events: string[] = [];
  private output = new PushQueue<OutputFrame>();
  private exited!: (exit: ContainerExit) => void;
  private readonly exit = new Promise<ContainerExit>((resolve) => (this.exited = resolve));

  async ping() {
    if (this.pingError) throw this.pingError;
  }
  async create(spec: ContainerSpec) {
    if (this.imageMissing) throw new ImageNotFoundError(spec.image);
    this.created.push(spec);
    this.events.push("create");
    return "c1";
  }
  async attach() {
    this.events.push("attach");
    return this.output;
  }
  async start() {
    this.events.push("start");
    this.running = true;
    setTimeout(() => {
      for (const frame of this.frames) this.output.push(frame);
      if (!this.runForever) this.finish(this.exitCode);
    }, 5);
  }
  wait(_id: string) {
    return this.exit;
  }
  /** How many stop calls fail (an engine that answers 500) before one works; Infinity: none does. */
  stopFailures = 0;
  /** How many remove calls fail before one works. */
  removeFailures = 0;
  /** Whether the container is still running (started, not exited). */
  running = false;
  async stop(_id: string, graceMs: number) {
    this.events.push(`stop:${graceMs}`);
    if (this.stopFailures > 0) {
      this.stopFailures--;
      throw new Error("(HTTP code 500) server error - cannot stop container: tried to kill container, but did not receive an exit event");
    }
    this.finish(143);
  }
  async remove() {
    // Force-removing a running container kills it (SIGKILL): its wait ends, and so does its
    // output ("exited:137" follows "remove" in the events).
    this.events.push("remove");
    if (this.removeFailures > 0) {
      this.removeFailures--;
      throw new Error("(HTTP code 500) server error - could not kill running container");
    }
    if (this.running) this.finish(137);
  }
  async list(): Promise<ContainerSummary[]> {
    return [];
  }
  presentImages = new Set<string>(["outpost/demo-agent:latest"]);
  pullable = new Set<string>();
  async imagePresent(image: string) {
    return this.presentImages.has(image);
  }
  async pull(image: string) {
    this.events.push(`pull:${image}`);
    if (!this.pullable.has(image)) throw new Error("registry unreachable");
    this.presentImages.add(image);
    this.imageMissing = false;
  }
  async rename(_id: string, name: string) {
    this.events.push(`rename:${name}`);
  }
  /** What `environment` answers (a cold container's Config.Env). */
  env: Record<string, string> = {};
  async environment() {
    return this.env;
  }
  /** Ends the container with `exitCode` (as when it exits on its own). */
  finish(exitCode: number) {
    if (this.running) this.events.push(`exited:${exitCode}`);
    this.running = false;
    this.output.end();
    this.exited({ exitCode, oomKilled: this.oomKilled });
  }
}

export class FakeLeases implements LeaseClient {
  readonly reports: RunStateReport[] = [];
  heartbeats = 0;
  heartbeatAnswer: () => HeartbeatAnswer | Promise<HeartbeatAnswer> = () => ({
    expireTime: new Date(Date.now() + 600),
    cancelRequested: false,
    logGrant: `log-grant-renewed-${this.heartbeats}`,
  });
  acquired = 0;

  async acquire(): Promise<Lease | undefined> {
    this.acquired++;
    return undefined;
  }
  async heartbeat(): Promise<HeartbeatAnswer> {
    this.heartbeats++;
    return this.heartbeatAnswer();
  }
  /** Refuse reports that carry a result, as a dispatcher does one too large for it. */
  refuseResults = false;
  async report(report: RunStateReport) {
    this.reports.push(report);
    if (this.refuseResults && report.result !== undefined) throw new ReportRefusedError("message size 5767144 is larger than configured readMaxBytes 4194304");
  }
  readonly released: Array<{ dispatchId: string; reason: string; infrastructureFailure: boolean; runtimeFailure: boolean }> = [];
  /** Answers like a dispatcher without contract C when false. */
  supportsRelease = true;
  held: Lease[] | undefined = [];
  async release(dispatchId: string, _leaseId: string, reason: string, infrastructureFailure: boolean, runtimeFailure = false) {
    if (!this.supportsRelease) throw new NotSupportedError("no ReleaseLease");
    this.released.push({ dispatchId, reason, infrastructureFailure, runtimeFailure });
  }
  async *watchCancellations(): AsyncIterable<{ dispatchId: string; leaseId: string }> {
    yield* [];
    throw new NotSupportedError("no WatchCancellations");
  }
  async listLeases(): Promise<Lease[]> {
    if (!this.held) throw new NotSupportedError("no ListExecutorLeases");
    return this.held;
  }
}

/** Run directories in memory: the test sets the result the "agent" wrote. */
export class FakeWorkspaces implements Workspaces {
  result: string | undefined;
  readonly created: string[] = [];
  readonly removed: string[] = [];
  readonly checkouts: Array<{ url: string; ref: string }> = [];
  checkoutError: Error | undefined;
  /** How long a checkout takes (a large repository). */
  checkoutDelayMs = 0;
  readonly startFiles: string[] = [];
  /** What `diskUsage` answers, one measurement after the other (the last one repeats); 0 when empty. */
  usage: Array<number | Error> = [];
  readonly measurements: number[] = [];
  filesOf(name: string): RunFiles {
    return { root: `/runs/${name}`, workspace: `/runs/${name}/workspace`, control: `/runs/${name}/control` };
  }
  async create(name: string) {
    this.created.push(name);
    return this.filesOf(name);
  }
  /** Checkouts ended by their signal (a cancel, a lost lease, the quota) before they were done. */
  checkoutsStopped = 0;
  async checkout(_files: RunFiles, url: string, ref: string, signal?: AbortSignal) {
    // As the host adapter does: its signal ends the checkout at once (git's process group killed).
    if (this.checkoutDelayMs > 0) await sleep(this.checkoutDelayMs, signal);
    if (signal?.aborted) {
      this.checkoutsStopped++;
      throw new CheckoutError("checkout stopped", { cause: signal.reason });
    }
    if (this.checkoutError) throw this.checkoutError;
    this.checkouts.push({ url, ref });
  }
  async readResult() {
    return this.result;
  }
  /** Claims recorded, by run directory root (a warm run's only record of its dispatch). */
  readonly claims = new Map<string, RunClaim>();
  async recordClaim(files: RunFiles, claim: RunClaim) {
    this.claims.set(files.root, claim);
  }
  async readClaim(files: RunFiles) {
    return this.claims.get(files.root);
  }
  async makeStartFifo() {}
  async writeStartFile(_files: RunFiles, content: string) {
    this.startFiles.push(content);
  }
  async remove(files: RunFiles) {
    this.removed.push(files.root);
  }
  async listRuns(): Promise<string[]> {
    return [];
  }
  async diskUsage(_files: RunFiles, stopAboveBytes: number) {
    this.measurements.push(stopAboveBytes);
    const next = (this.usage.length > 1 ? this.usage.shift() : this.usage[0]) ?? 0;
    if (next instanceof Error) throw next;
    return next;
  }
}

export function stdout(text: string): OutputFrame {
  return { stream: "stdout", data: Buffer.from(text) };
}

export function stderr(text: string): OutputFrame {
  return { stream: "stderr", data: Buffer.from(text) };
}

/** Hands out queued leases, as the dispatcher's AcquireLease would. */
export class QueuedLeases extends FakeLeases {
  readonly queue: Lease[] = [];
  override async acquire(): Promise<Lease | undefined> {
    return this.queue.shift();
  }
}

/** Keeps each run's output apart. */
export class RunSink extends FakeSink {
  private readonly byRun = new Map<string, FakeConnection[]>();
  override open(run: Parameters<FakeSink["open"]>[0], handlers: LogConnectionHandlers): LogConnection {
    const connection = super.open(run, handlers) as FakeConnection;
    this.byRun.set(run.dispatchId, [...(this.byRun.get(run.dispatchId) ?? []), connection]);
    return connection;
  }
  textsOf(dispatchId: string): string[] {
    return (this.byRun.get(dispatchId) ?? []).flatMap((c) => c.batches.flat().map((line) => line.text));
  }
}
