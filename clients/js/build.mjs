// Builds dist/: herald.mjs (ES module), herald.js (classic script defining
// globalThis.Herald, minified) and herald.d.ts; prints the classic build's gzipped size.
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

const common = { entryPoints: ['src/herald.ts'], bundle: true, target: 'es2020', logLevel: 'warning' };
await build({ ...common, format: 'esm', outfile: 'dist/herald.mjs' });
await build({ ...common, format: 'iife', globalName: 'Herald', minify: true, outfile: 'dist/herald.js' });
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json'], { stdio: 'inherit' });
// The API's types: test/types.check.ts must compile, its @ts-expect-error lines included.
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.types.json'], { stdio: 'inherit' });
const gz = gzipSync(readFileSync('dist/herald.js'), { level: 9 }).length;
console.log(`dist/herald.js: ${gz} bytes minified and gzipped (budget 8192)`);
if (gz > 8192) process.exit(1);
