/**
 * Routes cancellations streamed by the dispatcher (LeaseService.WatchCancellations) to the run
 * they concern, so a cancel stops its container at once rather than at the next heartbeat.
 * A cancel that arrives before its run registered (the stream sends flagged runs first) is
 * remembered briefly and applied on registration.
 */
export class Cancellations {
  private readonly handlers = new Map<string, () => void>();
  /** Cancels seen for runs not (yet) registered here, with when they arrived. */
  private readonly early = new Map<string, number>();

  private static key(dispatchId: string, leaseId: string): string {
    return `${dispatchId}/${leaseId}`;
  }

  /** Calls `onCancel` when this run is cancelled; returns the unregistration. */
  register(dispatchId: string, leaseId: string, onCancel: () => void): () => void {
    const key = Cancellations.key(dispatchId, leaseId);
    if (this.early.delete(key)) {
      queueMicrotask(onCancel);
    }
    this.handlers.set(key, onCancel);
    return () => {
      if (this.handlers.get(key) === onCancel) this.handlers.delete(key);
    };
  }

  notify(dispatchId: string, leaseId: string): void {
    const key = Cancellations.key(dispatchId, leaseId);
    const handler = this.handlers.get(key);
    if (handler) {
      handler();
      return;
    }
    const now = Date.now();
    for (const [k, at] of this.early) if (now - at > 60_000) this.early.delete(k);
    if (this.early.size < 1000) this.early.set(key, now);
  }
}
