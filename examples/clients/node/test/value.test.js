'use strict';
// google.protobuf.Value <-> JSON through the client's own encoding path (proto-loader's serializer for
// InvokeSkillRequest), for every kind of JSON value.
const test = require('node:test');
const assert = require('node:assert');
const protoLoader = require('@grpc/proto-loader');
const { toValue, fromValue } = require('../lib/value');
const { LOADER_OPTIONS } = require('../lib/protos');

const definition = protoLoader.loadSync('clawhub/gateway/v1/gateway_service.proto', LOADER_OPTIONS);
const invoke = definition['clawhub.gateway.v1.GatewayService'].InvokeSkill;

function roundTrip(json) {
  const bytes = invoke.requestSerialize({ name: 'com.example.echo', input: toValue(json) });
  return fromValue(invoke.requestDeserialize(bytes).input);
}

const CASES = [null, true, false, 0, -1.5, 1e300, 2 ** 53, '', 'text ✓', [], {}, [null, [1, [2]], { a: [] }],
  { a: null, b: false, c: 0, d: '', e: { f: { g: [true] } } }, JSON.parse('{"__proto__": {"x": 1}}')];

for (const json of CASES) {
  test(`round trip of ${JSON.stringify(json)}`, () => {
    assert.deepStrictEqual(roundTrip(json), json);
  });
}

test('the Value objects are what proto-loader expects', () => {
  assert.deepStrictEqual(toValue(null), { nullValue: 'NULL_VALUE' });
  assert.deepStrictEqual(toValue([1, 'a']), { listValue: { values: [{ numberValue: 1 }, { stringValue: 'a' }] } });
  assert.deepStrictEqual(toValue({ k: true }), { structValue: { fields: { k: { boolValue: true } } } });
});

test('what is not JSON is refused', () => {
  for (const bad of [NaN, Infinity, -Infinity, undefined, () => 1, 1n]) {
    assert.throws(() => toValue(bad), TypeError);
  }
});

test('an absent Value is undefined, a Value with no kind is null', () => {
  assert.strictEqual(fromValue(undefined), undefined);
  assert.strictEqual(fromValue({}), null);
  assert.deepStrictEqual(fromValue({ kind: 'structValue', structValue: { fields: { a: {} } } }), { a: null });
});
