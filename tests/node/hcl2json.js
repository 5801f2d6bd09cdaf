// Parses each Terraform file given on the command line with HashiCorp's HCL
// parser (compiled to WebAssembly, @cdktf/hcl2json) and prints one JSON
// document per file; exits 1 on the first file that does not parse.
const fs = require('fs');
const { parse } = require('@cdktf/hcl2json');

(async () => {
  const out = {};
  for (const f of process.argv.slice(2)) {
    try {
      out[f] = await parse(f, fs.readFileSync(f, 'utf8'));
    } catch (e) {
      console.error(`${f}: ${e.message || e}`);
      process.exit(1);
    }
  }
  process.stdout.write(JSON.stringify(out));
})();
