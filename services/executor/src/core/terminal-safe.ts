/**
 * An agent's output reaches people's terminals (`outpost logs`, `dispatch --follow`) and the
 * console as it was printed. Control characters and escape sequences in it would act there:
 * OSC 52 writes the viewer's clipboard, OSC 0 its window title, cursor moves and a bare CR
 * overwrite or hide lines already shown (a forged "done" over an error), BEL rings, and the C1
 * controls (U+0080–U+009F, e.g. U+009B CSI) start sequences too. So every control character
 * of a line is shipped as a visible stand-in: C0 ones and DEL as their Unicode control
 * pictures (ESC → ␛, CR → ␍, NUL → ␀, DEL → ␡), C1 ones as U+FFFD. Kept as they are: tab, and
 * SGR sequences (`ESC [ params m`: colours and styles, which agents' tools print and which move
 * nothing). Idempotent, so a line's held-back tail can be passed through it again.
 */

// eslint-disable-next-line no-control-regex -- matching control characters is the point
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f-\x9f]/;
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const SGR_OR_CONTROL = /\x1b\[[0-9;:]{0,64}m|[\x00-\x08\x0a-\x1f\x7f-\x9f]/g;

export function terminalSafe(text: string): string {
  if (!CONTROL.test(text)) return text;
  return text.replace(SGR_OR_CONTROL, (match) => (match.length > 1 ? match : standIn(match.charCodeAt(0))));
}

function standIn(code: number): string {
  if (code < 0x20) return String.fromCharCode(0x2400 + code);
  if (code === 0x7f) return "\u2421";
  return "\ufffd";
}
