// com.example.hello-js: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
//
// ABI component-v1: a WebAssembly component of the world in wit/skill.wit, built by `clawhub build` with
// componentize-js (`npm install`). See docs/skills/js.md.

const PREFIX = new TextEncoder().encode('{"hello":');

// input: Uint8Array. Return the output bytes; throw a string to fail the call with it as the message.
export function run(input) {
  if (input.length === 0) {
    throw 'send some JSON, such as "world"';
  }
  const out = new Uint8Array(PREFIX.length + input.length + 1);
  out.set(PREFIX);
  out.set(input, PREFIX.length);
  out[out.length - 1] = 0x7d; // '}'
  return out;
}
