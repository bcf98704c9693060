// com.example.counter-js: a counter in the skill's key-value store (`kv`) that can also fetch a URL
// (`http:HOST`), the JavaScript twin of examples/skills/counter-python.
//
// ABI component-v1: a WebAssembly component of the world `skill-kv-http` in wit/skill.wit, built by
// `clawhub build` with componentize-js (`npm install` first). `clawhub build` picks that world from the
// capabilities in skill.toml (`kv` and an `http:` one). See docs/skills/js.md.
//
// Input: a JSON object. Each call adds one to the counter; with "url", it also GETs that URL (only the hosts the
// manifest's `http:` capabilities name are reachable; a call whose request fails does not count). Output:
// {"count": N}, plus "status" and "body" (the response body as text) when a URL was given.
// {"reset": true} sets the counter back to 0 instead.

// The world's imports, as componentize-js names them: an interface by its full name (functions in
// camelCase), a function of the world itself (`log`) as the default export of a module of its name.
import log from 'log';
import { get, put } from 'clawhub:skill/kv@1.0.0';
import { request } from 'clawhub:skill/http@1.0.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const COUNTER_KEY = encoder.encode('count');

function reply(value) {
  return encoder.encode(JSON.stringify(value));
}

// input: Uint8Array. Returns the output bytes; a thrown string fails the call with it as the message.
// A host refusal ("HTTP_HOST_NOT_ALLOWED: ...", "KV_VALUE_TOO_LARGE: ...") is thrown by the import as a
// ComponentError whose `payload` is that text; left uncaught, it fails the call with that text, as this skill does.
export function run(input) {
  let args;
  try {
    args = JSON.parse(decoder.decode(input));
  } catch (e) {
    throw `the input is not JSON: ${e.message}`;
  }
  if (args === null || typeof args !== 'object' || Array.isArray(args)) {
    throw 'send a JSON object: {} counts, {"url": "http://..."} counts and fetches, {"reset": true} resets';
  }
  if (args.reset === true) {
    put(COUNTER_KEY, encoder.encode('0'), 0n); // ttl-ms is a u64: a BigInt, 0n never expires
    return reply({ count: 0 });
  }
  const stored = get(COUNTER_KEY); // option<list<u8>>: a Uint8Array, or undefined
  const count = (stored ? Number(decoder.decode(stored)) : 0) + 1;
  const result = { count };
  const url = args.url;
  if (url !== undefined) {
    if (typeof url !== 'string') {
      throw '"url" must be a string';
    }
    const response = request('GET', url, [['accept', 'text/plain, application/json']], new Uint8Array());
    log(`GET ${url}: ${response.status}, ${response.body.length} bytes`);
    result.status = response.status;
    result.body = decoder.decode(response.body);
  }
  // Stored last: a call that fails (a refused URL) does not count.
  put(COUNTER_KEY, encoder.encode(String(count)), 0n);
  return reply(result);
}
