/**
 * The built-in agents' images (deploy/agents) cannot be built on these offline machines, so CI
 * checks them statically and runs each entrypoint for real against a stand-in for its CLI: the
 * entrypoint must parse (`sh -n`), pass the contract's task, model and workspace to the CLI's
 * flags in non-interactive mode, keep the CLI's exit code, and write the result file.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ROOT } from "./boundary-harness.ts";

const AGENTS = path.join(ROOT, "deploy/agents");

/** Per agent: the package installed, the CLI's name, the flags the contract maps to. */
const EXPECTED = {
  claude: { install: "npm install -g @anthropic-ai/claude-code", cli: "claude", flags: ["-p", "TASK", "--model", "MODEL", "--dangerously-skip-permissions"] },
  codex: { install: "npm install -g @openai/codex", cli: "codex", flags: ["exec", "--model", "MODEL", "--full-auto", "--cd", "WORKSPACE", "TASK"] },
  gemini: { install: "npm install -g @google/gemini-cli", cli: "gemini", flags: ["-p", "TASK", "--model", "MODEL", "--yolo"] },
  grok: { install: "npm install -g @vibe-kit/grok-cli", cli: "grok", flags: ["--prompt", "TASK", "--model", "MODEL", "--directory", "WORKSPACE"] },
  aider: { install: 'pip install --no-cache-dir "aider-chat==', cli: "aider", flags: ["--model", "MODEL", "--message", "TASK", "--yes-always"] },
} as const;

const hasPython = spawnSync("python3", ["--version"]).status === 0;

describe("agent images (deploy/agents)", () => {
  for (const [agent, expected] of Object.entries(EXPECTED)) {
    describe(agent, () => {
      const dockerfile = fs.readFileSync(path.join(AGENTS, agent, "Dockerfile"), "utf8");
      const entrypoint = path.join(AGENTS, agent, "entrypoint.sh");

      it("Dockerfile installs the real CLI on a multi-arch base and runs the entrypoint", () => {
        expect(dockerfile).toMatch(/^FROM (node|python):\$\{[A-Z_]+\}-(bookworm-slim|slim-bookworm)$/m);
        expect(dockerfile).not.toMatch(/^FROM --platform/m); // buildx picks the platform per target
        expect(dockerfile).toContain(expected.install);
        expect(dockerfile).toContain(`COPY ${agent}/entrypoint.sh /opt/outpost/entrypoint.sh`);
        expect(dockerfile).toContain('ENTRYPOINT ["/opt/outpost/entrypoint.sh"]');
        expect(dockerfile).toMatch(/^USER 65534:65534$/m);
        expect(dockerfile).toContain("OUTPOST_RESULT_PATH=/workspace/.outpost/result.json");
        // The checkout belongs to the executor's user, not the agent's: git must still work in it.
        expect(dockerfile).toContain("git config --system --add safe.directory /workspace");
      });

      it("entrypoint parses and uses every contract variable", () => {
        execFileSync("sh", ["-n", entrypoint]);
        const text = fs.readFileSync(entrypoint, "utf8");
        for (const name of ["OUTPOST_TASK", "OUTPOST_MODEL", "OUTPOST_WORKSPACE", "OUTPOST_RESULT_PATH"]) expect(text).toContain(name);
      });

      it.skipIf(agent === "aider" && !hasPython)("entrypoint maps the contract onto the CLI's flags and writes the result", () => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), `outpost-agent-${agent}-`));
        try {
          const bin = path.join(dir, "bin");
          const workspace = path.join(dir, "workspace");
          const tmp = path.join(dir, "tmp");
          fs.mkdirSync(bin);
          fs.mkdirSync(workspace);
          fs.mkdirSync(tmp);
          // The stand-in CLI records its arguments and working directory, prints an answer, exits 3.
          fs.writeFileSync(
            path.join(bin, expected.cli),
            `#!/bin/sh\nprintf '%s\\n' "$@" > "${dir}/args"\npwd > "${dir}/cwd"\necho "the final answer"\nexit 3\n`,
            { mode: 0o755 },
          );
          const task = "fix the bug in 'main.c' now";
          const model = "model-x-1";
          const result = spawnSync("sh", [entrypoint], {
            encoding: "utf8",
            env: {
              PATH: `${bin}:${path.dirname(process.execPath)}:/usr/local/bin:/usr/bin:/bin:${process.env.PATH}`,
              TMPDIR: tmp,
              OUTPOST_TASK: task,
              OUTPOST_MODEL: model,
              OUTPOST_WORKSPACE: workspace,
              OUTPOST_RESULT_PATH: path.join(workspace, ".outpost/result.json"),
              OUTPOST_AGENT_LIB: path.join(AGENTS, "lib"),
            },
          });
          expect(result.stdout).toContain("the final answer"); // the live log
          expect(result.status).toBe(3);
          const args = fs.readFileSync(path.join(dir, "args"), "utf8").trimEnd().split("\n");
          const want = expected.flags.map((f) => (f === "TASK" ? task : f === "MODEL" ? model : f === "WORKSPACE" ? workspace : f));
          // Every expected flag is passed, in this order, and each value right after its flag.
          let at = -1;
          for (const flag of want) {
            const next = args.indexOf(flag, at + 1);
            expect(next, `${flag} in ${JSON.stringify(args)}`).toBeGreaterThan(at);
            at = next;
          }
          expect(fs.readFileSync(path.join(dir, "cwd"), "utf8").trim()).toBe(fs.realpathSync(workspace));
          const written = JSON.parse(fs.readFileSync(path.join(workspace, ".outpost/result.json"), "utf8"));
          expect(written).toEqual({ agent, model, exit_code: 3, summary: "the final answer" });
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      });
    });
  }
});
