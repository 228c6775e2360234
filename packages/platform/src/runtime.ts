/**
 * Process-wide runtime fixes every service applies at start-up (`startServer`); the V8 flags
 * that go with them are in scripts/lib/mesh.ts and the image (docs/operations.md, "Runtime").
 *
 * `AsyncResource#bind`: Node 24 defines a deprecated `asyncResource` accessor (DEP0172) on every
 * function it returns, with a fresh getter and setter each time. V8 then keeps the function
 * reachable for young-generation collections until the next full one, and with it whatever the
 * function closes over (measured: a loop binding one function per iteration promotes 15 % of what
 * it allocates to the old generation, 0.1 % without the accessor). Node's HTTP/2 client binds one
 * such function per request, so each call the gateway forwarded went to the old generation whole,
 * and full collections came every few seconds under load (README, Benchmarks). The replacement
 * behaves the same (runs `fn` in the resource's async scope with the caller's `this`, or
 * `thisArg`; keeps `fn.length`) and keeps `asyncResource` as a plain property, without the
 * deprecation warning.
 *
 * `AbortController#abort()` without a reason: Node makes the reason a new `DOMException`
 * ("AbortError"), which captures a stack trace, async frames included. connect aborts two
 * controllers so at the end of every call it serves over HTTP/2 (the call's context, the request
 * when its stream closes), and under load those stack captures were 6.6 % of the dispatcher's
 * CPU (a CPU profile at saturation, 2026-11-23: about 50 µs a call). The replacement passes a new AbortError DOMException made without the stack
 * (same name, message and code; only `stack` lacks the frames); an abort with a reason is
 * unchanged.
 */
import { AsyncResource } from "node:async_hooks";

const APPLIED = Symbol.for("outpost.runtime-fixes");

type Bind = (this: AsyncResource, fn: (...args: unknown[]) => unknown, thisArg?: unknown) => (...args: unknown[]) => unknown;

function bindTo(resource: AsyncResource, fn: (...args: unknown[]) => unknown, thisArg?: unknown): (...args: unknown[]) => unknown {
  if (typeof fn !== "function") {
    throw Object.assign(new TypeError(`The "fn" argument must be of type function. Received ${fn === null ? "null" : typeof fn}`), {
      code: "ERR_INVALID_ARG_TYPE",
    });
  }
  const bound =
    thisArg === undefined
      ? function (this: unknown, ...args: unknown[]) {
          return resource.runInAsyncScope(fn, this, ...args);
        }
      : resource.runInAsyncScope.bind(resource, fn, thisArg);
  Object.defineProperty(bound, "length", { configurable: true, enumerable: false, writable: false, value: fn.length });
  Object.defineProperty(bound, "asyncResource", { configurable: true, enumerable: true, writable: true, value: resource });
  return bound;
}

const bind: Bind = function bind(fn, thisArg) {
  return bindTo(this, fn, thisArg);
};

type Abort = (this: AbortController, reason?: unknown) => void;

/** What `abort()` without a reason aborts with, as Node's, minus the stack capture. */
function abortErrorWithoutStack(): DOMException {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return new DOMException("This operation was aborted", "AbortError");
  } finally {
    Error.stackTraceLimit = limit;
  }
}

const registry = globalThis as { [APPLIED]?: { nodeBind: Bind; nodeAbort: Abort } };
const prototype = AsyncResource.prototype as unknown as { bind: Bind };
const controllerPrototype = AbortController.prototype as { abort: Abort };

/** Applies the fixes above once per process; later calls do nothing. */
export function applyRuntimeFixes(): void {
  if (registry[APPLIED]) return;
  const nodeAbort = controllerPrototype.abort;
  registry[APPLIED] = { nodeBind: prototype.bind, nodeAbort };
  prototype.bind = bind;
  // A method, as Node's is: not a constructor, and `length` 0 (Node's reason is a default parameter).
  controllerPrototype.abort = {
    abort(this: AbortController, ...args: unknown[]) {
      nodeAbort.call(this, args[0] === undefined ? abortErrorWithoutStack() : args[0]);
    },
  }.abort;
}

/** Node's own `AbortController#abort`, also after the fix (its test shows why the fix exists). */
export function nodeAbortControllerAbort(): Abort {
  return registry[APPLIED]?.nodeAbort ?? controllerPrototype.abort;
}

/** Node's own `AsyncResource#bind`, also after the fix (its test shows why the fix exists). */
export function nodeAsyncResourceBind(): Bind {
  return registry[APPLIED]?.nodeBind ?? prototype.bind;
}
