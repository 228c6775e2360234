/**
 * A small in-memory stand-in for the few MongoDB collection calls the tenant store's admission
 * uses (insertOne, findOne, findOneAndUpdate, updateOne, deleteOne, countDocuments), with the
 * filter and update operators it writes ($or, $exists, $ne, $lt, $lte, $gt, $in, dotted paths
 * and array indexes; $set, $setOnInsert, $inc, $addToSet, $pull). It lets the server-free tests
 * inject failures and interleave other calls between two writes, which a real server cannot be
 * made to do on cue. Not a MongoDB: only what those calls need, each applied atomically.
 */
import { Binary, MongoServerError } from "mongodb";

/* eslint-disable @typescript-eslint/no-explicit-any -- documents and filters are schemaless here */
type Doc = Record<string, any>;
type Method = "insertOne" | "findOne" | "findOneAndUpdate" | "updateOne" | "deleteOne" | "countDocuments";

/** A planned failure: the next call of `method` whose filter/update `when` accepts throws. */
export interface Failure {
  method: Method;
  when?: (filter: Doc, update?: Doc) => boolean;
  /** The write is applied, then the call throws (the reply was lost). */
  applied?: boolean;
}

function get(doc: any, path: string): any {
  return path.split(".").reduce((v, k) => (v == null ? undefined : v[k]), doc);
}

/** Bytes as the driver stores them: a Uint8Array (Buffer) or a BSON Binary compare by content. */
function bytesOf(v: any): Uint8Array | undefined {
  if (v instanceof Binary) return v.value();
  return v instanceof Uint8Array ? v : undefined;
}

function eq(a: any, b: any): boolean {
  if (b === null) return a === null || a === undefined;
  const [x, y] = [bytesOf(a), bytesOf(b)];
  if (x && y) return Buffer.from(x).equals(Buffer.from(y));
  if (a instanceof Date && b instanceof Date) return a.getTime() === b.getTime();
  if (Array.isArray(a) && !Array.isArray(b)) return a.some((x) => eq(x, b));
  return a === b;
}

const isOperatorObject = (c: any) =>
  c !== null && typeof c === "object" && !(c instanceof Date) && !Array.isArray(c) && Object.keys(c).some((k) => k.startsWith("$"));

function matchValue(v: any, cond: any): boolean {
  if (!isOperatorObject(cond)) return eq(v, cond);
  return Object.entries(cond).every(([op, x]: [string, any]) => {
    switch (op) {
      case "$exists":
        return (v !== undefined) === x;
      case "$ne":
        return !eq(v, x);
      case "$lt":
        return v != null && v < x;
      case "$lte":
        return v != null && v <= x;
      case "$gt":
        return v != null && v > x;
      case "$in":
        return x.some((y: any) => eq(v, y));
      default:
        throw new Error(`fake mongo: filter operator ${op}`);
    }
  });
}

export function matches(doc: Doc, filter: Doc): boolean {
  return Object.entries(filter).every(([k, c]) => (k === "$or" ? (c as Doc[]).some((f) => matches(doc, f)) : matchValue(get(doc, k), c)));
}

function apply(doc: Doc, update: Doc, inserting: boolean): void {
  for (const [op, fields] of Object.entries<Doc>(update)) {
    for (const [k, v] of Object.entries<any>(fields)) {
      if (op === "$set") doc[k] = v;
      else if (op === "$setOnInsert") {
        if (inserting) doc[k] = v;
      } else if (op === "$inc") doc[k] = (doc[k] ?? 0) + v;
      else if (op === "$addToSet") {
        doc[k] ??= [];
        if (!doc[k].includes(v)) doc[k].push(v);
      } else if (op === "$pull") {
        if (doc[k]) doc[k] = doc[k].filter((x: any) => x !== v);
      } else throw new Error(`fake mongo: update operator ${op}`);
    }
  }
}

export class FakeCollection {
  readonly docs = new Map<string, Doc>();
  readonly failures: Failure[] = [];
  /** Runs before each call (after a planned failure is picked): interleaves another call's writes. */
  before: ((method: Method, filter: Doc, update?: Doc) => Promise<void> | void) | undefined;

  /** Throws when a planned failure matches; `applied` ones throw after the write. */
  private async enter(method: Method, filter: Doc, update?: Doc): Promise<Failure | undefined> {
    const i = this.failures.findIndex((f) => f.method === method && (!f.when || f.when(filter, update)));
    const failure = i >= 0 ? this.failures.splice(i, 1)[0] : undefined;
    await this.before?.(method, filter, update);
    if (failure && !failure.applied) throw new Error(`injected ${method} failure`);
    return failure;
  }

  private static leave(failure: Failure | undefined, method: Method): void {
    if (failure) throw new Error(`injected ${method} failure after the write`);
  }

  private find1(filter: Doc): Doc | undefined {
    for (const d of this.docs.values()) if (matches(d, filter)) return d;
    return undefined;
  }

  async insertOne(doc: Doc) {
    const failure = await this.enter("insertOne", doc);
    if (this.docs.has(doc._id)) throw new MongoServerError({ message: "E11000 duplicate key error", code: 11000 });
    this.docs.set(doc._id, structuredClone(doc));
    FakeCollection.leave(failure, "insertOne");
    return { acknowledged: true, insertedId: doc._id };
  }

  async findOne(filter: Doc, _options?: unknown) {
    await this.enter("findOne", filter);
    const d = this.find1(filter);
    return d ? structuredClone(d) : null;
  }

  async findOneAndUpdate(filter: Doc, update: Doc, options: { returnDocument?: "before" | "after" } = {}) {
    const failure = await this.enter("findOneAndUpdate", filter, update);
    const d = this.find1(filter);
    if (!d) {
      FakeCollection.leave(failure, "findOneAndUpdate");
      return null;
    }
    const before = structuredClone(d);
    apply(d, update, false);
    FakeCollection.leave(failure, "findOneAndUpdate");
    return options.returnDocument === "after" ? structuredClone(d) : before;
  }

  async updateOne(filter: Doc, update: Doc, options: { upsert?: boolean } = {}) {
    const failure = await this.enter("updateOne", filter, update);
    const d = this.find1(filter);
    let result = { matchedCount: 0, modifiedCount: 0, upsertedCount: 0 };
    if (d) {
      apply(d, update, false);
      result = { matchedCount: 1, modifiedCount: 1, upsertedCount: 0 };
    } else if (options.upsert) {
      const inserted: Doc = { _id: filter._id };
      apply(inserted, update, true);
      this.docs.set(inserted._id, inserted);
      result = { matchedCount: 0, modifiedCount: 0, upsertedCount: 1 };
    }
    FakeCollection.leave(failure, "updateOne");
    return result;
  }

  async deleteOne(filter: Doc) {
    const failure = await this.enter("deleteOne", filter);
    const d = this.find1(filter);
    if (d) this.docs.delete(d._id);
    FakeCollection.leave(failure, "deleteOne");
    return { deletedCount: d ? 1 : 0 };
  }

  async countDocuments(filter: Doc) {
    await this.enter("countDocuments", filter);
    let n = 0;
    for (const d of this.docs.values()) if (matches(d, filter)) n++;
    return n;
  }
}
/* eslint-enable @typescript-eslint/no-explicit-any */
