'use strict';
// Structured errors: every non-OK status from clawhub carries a google.rpc.Status, binary-encoded, in the
// `grpc-status-details-bin` trailer. Its `details` are Any messages: an ErrorInfo (reason, domain, metadata),
// a BadRequest (field violations) for an INVALID_ARGUMENT about a field, a RetryInfo where retrying helps.
const grpc = require('@grpc/grpc-js');
const { loadErrorTypes } = require('./protos');

const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
// As the protobuf JSON mapping prints them: fields at their default left out (but [] and {} kept).
const TO_OBJECT = { longs: String, enums: String, arrays: true, objects: true };
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

let errorTypes;

// The decoded google.rpc.Status of a failed call, as a plain object:
//   { code, code_name, message, details: [{ '@type': 'type.googleapis.com/google.rpc.ErrorInfo', reason, ... }] }
// or null when the call carried no details (gRPC's own errors, such as UNAVAILABLE for an unreachable server).
function statusDetails(err) {
  const trailer = err && err.metadata ? err.metadata.get(STATUS_DETAILS_KEY) : [];
  if (!trailer || trailer.length === 0) return null;
  errorTypes = errorTypes || loadErrorTypes();
  const Status = errorTypes.lookupType('google.rpc.Status');
  const status = Status.decode(Buffer.from(trailer[0]));
  return {
    code: status.code,
    code_name: CODE_NAMES[status.code] || String(status.code),
    message: status.message,
    details: status.details.map(unpackAny),
  };
}

// An Any as `{ '@type': type_url, ...fields }` (the protobuf JSON mapping of Any); a type this client does not
// know keeps its bytes in `value` (base64).
function unpackAny(any) {
  const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
  let type;
  try {
    type = errorTypes.lookupType(typeName);
  } catch (_) {
    return { '@type': any.type_url, value: Buffer.from(any.value).toString('base64') };
  }
  const message = type.toObject(type.decode(any.value), TO_OBJECT);
  if (typeName === 'google.rpc.RetryInfo' && message.retry_delay) {
    const { seconds = '0', nanos = 0 } = message.retry_delay;
    message.retry_delay_seconds = Number(seconds) + nanos / 1e9; // a convenience beside the Duration
  }
  return { '@type': any.type_url, ...message };
}

// Human-readable lines: the status, then each detail.
function formatError(err) {
  const status = statusDetails(err);
  const code = CODE_NAMES[err.code] || String(err.code);
  const lines = [`error: ${code} (${err.code}): ${status ? status.message : err.details}`];
  for (const detail of (status && status.details) || []) {
    const type = detail['@type'].slice(detail['@type'].lastIndexOf('/') + 1);
    if (type === 'google.rpc.ErrorInfo') {
      lines.push(`  ErrorInfo: reason ${detail.reason || ''}, domain ${detail.domain || ''}`);
      for (const [key, value] of Object.entries(detail.metadata).sort()) lines.push(`    ${key}: ${value}`);
    } else if (type === 'google.rpc.BadRequest') {
      for (const violation of detail.field_violations) {
        lines.push(`  BadRequest: field ${violation.field || ''}: ${violation.description || ''}`);
      }
    } else if (type === 'google.rpc.RetryInfo') {
      lines.push(`  RetryInfo: retry after ${detail.retry_delay_seconds} s`);
    } else {
      lines.push(`  ${type}: ${JSON.stringify(detail)}`);
    }
  }
  return lines.join('\n');
}

module.exports = { statusDetails, formatError, STATUS_DETAILS_KEY };
