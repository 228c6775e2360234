/**
 * The edge's request-rate policy (SPEC G3): every call counts against its client IP and, once
 * authenticated, against its tenant, in the call's method class, per minute. Tier limits come
 * from the tenant service with the key; callers on the allow-list are not limited. Counting is
 * done by a `RateCounter` (rate-limiter-flexible on Redis with an in-memory insurance, or in
 * memory only) so this policy stays testable without either.
 */
import { BlockList, isIP } from "node:net";
import type { MethodClass } from "./method-class.ts";

/** Requests per minute, per method class. */
export type RateLimits = Record<MethodClass, number>;

export const DEFAULT_RATE_LIMITS: RateLimits = { create: 100, trigger: 500, read: 1000 };

/** The window every limit is counted over. */
export const RATE_WINDOW_MS = 60_000;

export interface CounterResult {
  allowed: boolean;
  /** Points left in the current window after this call (0 when refused). */
  remaining: number;
  /** Until the window resets. */
  msBeforeReset: number;
}

/** Counts one call for `key` in a fixed window of RATE_WINDOW_MS allowing `limit` calls. */
export interface RateCounter {
  consume(key: string, methodClass: MethodClass, limit: number): Promise<CounterResult>;
  close(): Promise<void>;
}

export interface RateDecision extends CounterResult {
  limit: number;
  /** Which budget decided: the tightest one that was consulted. */
  subject: "ip" | "tenant";
  methodClass: MethodClass;
}

export interface RateLimitPolicyOptions {
  counter: RateCounter;
  /** Limits for callers without tier limits, and for client IPs. */
  defaults: RateLimits;
  /** Limits per client IP (unauthenticated traffic included). */
  perIp: RateLimits;
  /** IPs and CIDRs that are never limited (internal callers, health checkers). */
  allow: readonly string[];
}

/** Parses "10.0.0.0/8, 127.0.0.1, ::1" into a BlockList; throws naming the bad entry. */
export function parseAllowList(entries: readonly string[]): BlockList {
  const list = new BlockList();
  for (const raw of entries) {
    const entry = raw.trim();
    if (entry === "") continue;
    const [address, prefix] = entry.split("/") as [string, string | undefined];
    const family = isIP(address);
    if (family === 0) throw new Error(`not an IP address or CIDR: ${entry}`);
    const type = family === 4 ? "ipv4" : "ipv6";
    if (prefix === undefined) list.addAddress(address, type);
    else {
      const bits = Number(prefix);
      if (!Number.isInteger(bits) || bits < 0 || bits > (family === 4 ? 32 : 128)) throw new Error(`bad CIDR prefix: ${entry}`);
      list.addSubnet(address, bits, type);
    }
  }
  return list;
}

/** "::ffff:127.0.0.1" -> "127.0.0.1", so v4 allow-list entries match dual-stack sockets. */
export function normalizeIp(ip: string): string {
  return ip.startsWith("::ffff:") && isIP(ip.slice(7)) === 4 ? ip.slice(7) : ip;
}

export class RateLimitPolicy {
  private readonly counter: RateCounter;
  private readonly defaults: RateLimits;
  private readonly perIp: RateLimits;
  private readonly allow: BlockList;

  constructor(options: RateLimitPolicyOptions) {
    this.counter = options.counter;
    this.defaults = options.defaults;
    this.perIp = options.perIp;
    this.allow = parseAllowList(options.allow);
  }

  isAllowListed(ip: string): boolean {
    const normalized = normalizeIp(ip);
    const family = isIP(normalized);
    if (family === 0) return false;
    return this.allow.check(normalized, family === 4 ? "ipv4" : "ipv6");
  }

  /** Counts the call against the client IP. */
  async checkIp(ip: string, methodClass: MethodClass): Promise<RateDecision | undefined> {
    if (this.isAllowListed(ip)) return undefined;
    const limit = this.perIp[methodClass];
    const result = await this.counter.consume(`ip:${normalizeIp(ip)}`, methodClass, limit);
    return { ...result, limit, subject: "ip", methodClass };
  }

  /** Counts the call against the tenant, under its tier's limits when the tenant service sent them. */
  async checkTenant(ip: string, tenantId: string, methodClass: MethodClass, tierLimits?: Partial<RateLimits>): Promise<RateDecision | undefined> {
    if (this.isAllowListed(ip)) return undefined;
    const tier = tierLimits?.[methodClass];
    const limit = tier !== undefined && tier > 0 ? tier : this.defaults[methodClass];
    const result = await this.counter.consume(`tenant:${tenantId}`, methodClass, limit);
    return { ...result, limit, subject: "tenant", methodClass };
  }

  close(): Promise<void> {
    return this.counter.close();
  }
}

/** The decision to report: a refusal if any, else the one with the fewest calls left. */
export function tightest(...decisions: (RateDecision | undefined)[]): RateDecision | undefined {
  let chosen: RateDecision | undefined;
  for (const d of decisions) {
    if (d === undefined) continue;
    if (chosen === undefined || (!d.allowed && chosen.allowed) || (d.allowed === chosen.allowed && d.remaining < chosen.remaining)) chosen = d;
  }
  return chosen;
}
