/** A writable that keeps what the CLI prints, for tests that run `runCli` in process. */
import { Writable } from "node:stream";

export class Capture extends Writable {
  text = "";
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: () => void) {
    this.text += chunk.toString();
    callback();
  }
}
