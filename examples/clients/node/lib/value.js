'use strict';
// google.protobuf.Value <-> plain JavaScript (JSON) values.
//
// proto-loader (with the options in lib/protos.js: oneofs, enums as strings) represents a Value as the plain
// object of its message, not as the JSON it stands for; these two helpers convert. The mapping is the one of
// the protobuf JSON mapping (https://protobuf.dev/programming-guides/json/):
//
//   JSON          Value message (proto-loader object)
//   null          { nullValue: 'NULL_VALUE' }
//   true/false    { boolValue: true }
//   1.5, 42       { numberValue: 1.5 }            a double: integers beyond 2^53 lose precision
//   "text"        { stringValue: 'text' }
//   [a, b]        { listValue: { values: [Value, Value] } }
//   {"k": v}      { structValue: { fields: { k: Value } } }
//
// The member names are camelCase even with `keepCase: true`: proto-loader takes google/protobuf/struct.proto
// from protobufjs's built-in definitions, which spell them so (test/value.test.js checks the round trip).
//
// NaN and ±Infinity are not JSON: toValue refuses them (the gateway would answer INVALID_INPUT). A Value message
// with no kind set stands for null. A Struct is a map: the order of its keys is not kept.

function toValue(json) {
  if (json === null) return { nullValue: 'NULL_VALUE' };
  switch (typeof json) {
    case 'boolean':
      return { boolValue: json };
    case 'number':
      if (!Number.isFinite(json)) throw new TypeError(`${json} is not a JSON number`);
      return { numberValue: json };
    case 'string':
      return { stringValue: json };
    case 'object':
      if (Array.isArray(json)) return { listValue: { values: json.map(toValue) } };
      return { structValue: toStruct(json) };
    default:
      throw new TypeError(`a ${typeof json} has no JSON form`);
  }
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) define(fields, key, toValue(value));
  return { fields };
}

function fromValue(value) {
  if (value === null || value === undefined) return undefined; // no Value at all (the field was not set)
  // With `oneofs: true`, proto-loader names the member that is set in `kind`.
  switch (value.kind) {
    case 'nullValue':
      return null;
    case 'boolValue':
      return value.boolValue;
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'listValue':
      return (value.listValue.values || []).map(fromValue);
    case 'structValue':
      return fromStruct(value.structValue);
    default:
      return null; // a Value with no kind set reads as null, as in protobuf's JSON mapping (and the gateway)
  }
}

function fromStruct(struct) {
  const object = {};
  for (const [key, value] of Object.entries((struct && struct.fields) || {})) define(object, key, fromValue(value));
  return object;
}

// An own property even for the key `__proto__` (plain assignment would set the object's prototype instead).
function define(object, key, value) {
  Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
}

module.exports = { toValue, fromValue, toStruct, fromStruct };
