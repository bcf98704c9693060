'use strict';
// Decoding the grpc-status-details-bin trailer: a google.rpc.Status with ErrorInfo, BadRequest and RetryInfo
// packed as Any, encoded here as a server would.
const test = require('node:test');
const assert = require('node:assert');
const grpc = require('@grpc/grpc-js');
const { loadErrorTypes } = require('../lib/protos');
const { statusDetails, formatError, STATUS_DETAILS_KEY } = require('../lib/errors');

const types = loadErrorTypes();
function pack(typeName, object) {
  const type = types.lookupType(typeName);
  return { type_url: `type.googleapis.com/${typeName}`, value: type.encode(type.fromObject(object)).finish() };
}

function failure() {
  const Status = types.lookupType('google.rpc.Status');
  const status = Status.encode(Status.fromObject({
    code: grpc.status.RESOURCE_EXHAUSTED,
    message: 'the executor is busy',
    details: [
      pack('google.rpc.ErrorInfo', { reason: 'EXECUTOR_OVERLOADED', domain: 'executor.clawhub', metadata: { queue: '64' } }),
      pack('google.rpc.BadRequest', { field_violations: [{ field: 'input', description: 'too large' }] }),
      pack('google.rpc.RetryInfo', { retry_delay: { seconds: 1, nanos: 500000000 } }),
      { type_url: 'type.googleapis.com/example.Unknown', value: Buffer.from([8, 1]) },
    ],
  })).finish();
  const metadata = new grpc.Metadata();
  metadata.set(STATUS_DETAILS_KEY, Buffer.from(status));
  return { code: grpc.status.RESOURCE_EXHAUSTED, details: 'the executor is busy', metadata };
}

test('the Status and its details are decoded', () => {
  const status = statusDetails(failure());
  assert.strictEqual(status.code_name, 'RESOURCE_EXHAUSTED');
  assert.strictEqual(status.message, 'the executor is busy');
  const [info, badRequest, retry, unknown] = status.details;
  assert.deepStrictEqual(info, { '@type': 'type.googleapis.com/google.rpc.ErrorInfo', reason: 'EXECUTOR_OVERLOADED',
    domain: 'executor.clawhub', metadata: { queue: '64' } });
  assert.deepStrictEqual(badRequest.field_violations.map((v) => [v.field, v.description]), [['input', 'too large']]);
  assert.strictEqual(retry.retry_delay_seconds, 1.5);
  assert.deepStrictEqual(unknown, { '@type': 'type.googleapis.com/example.Unknown', value: 'CAE=' });
});

test('the text form names the reason, the field and the delay', () => {
  const text = formatError(failure());
  assert.match(text, /^error: RESOURCE_EXHAUSTED \(8\): the executor is busy$/m);
  assert.match(text, /ErrorInfo: reason EXECUTOR_OVERLOADED, domain executor\.clawhub/);
  assert.match(text, /BadRequest: field input: too large/);
  assert.match(text, /RetryInfo: retry after 1\.5 s/);
});

test('a status without details is null', () => {
  assert.strictEqual(statusDetails({ code: 14, details: 'down', metadata: new grpc.Metadata() }), null);
});
