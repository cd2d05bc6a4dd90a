// Upload a file with tus-js-client (Node), as the tests' independent tus client.
//
//   node tests/tus_node_client.mjs <endpoint> <file> [options as JSON]
//
// options: protocol (tus-v1, ietf-draft-05), chunkSize (bytes), metadata {k: v}, headers {k: v}, uploadDataDuringCreation,
// uploadLengthDeferred, overridePatchMethod, abortAfter (bytes: abort there once, then resume from the upload's URL).
// Prints one JSON line {"url", "resumedFrom"} and exits 0, or the error on stderr and exits 1.
import { readFileSync } from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path, optionsText] = process.argv.slice(2);
const options = JSON.parse(optionsText || "{}");
const data = readFileSync(path);

function upload(uploadUrl, abortAfter) {
  return new Promise((resolve, reject) => {
    let aborted = false;
    let resumedFrom = null;
    const job = new tus.Upload(data, {
      endpoint,
      uploadUrl,
      protocol: options.protocol || "tus-v1",
      chunkSize: options.chunkSize || Infinity,
      metadata: options.metadata || {},
      headers: options.headers || {},
      uploadDataDuringCreation: !!options.uploadDataDuringCreation,
      uploadLengthDeferred: !!options.uploadLengthDeferred,
      overridePatchMethod: !!options.overridePatchMethod,
      retryDelays: [0, 200, 500, 1000],
      onProgress(sent) {
        if (resumedFrom === null) resumedFrom = sent;
      },
      onChunkComplete(_chunk, accepted) {
        if (abortAfter && !aborted && accepted >= abortAfter) {
          aborted = true;
          job.abort().then(() => resolve({ aborted: true, url: job.url }));
        }
      },
      onSuccess() {
        resolve({ url: job.url, resumedFrom });
      },
      onError: reject,
    });
    job.start();
  });
}

try {
  let result = await upload(undefined, options.abortAfter);
  if (result.aborted) {
    const resumed = await upload(result.url, 0);
    result = { url: resumed.url, resumedFrom: resumed.resumedFrom, abortedAt: result.url };
  }
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(String(error));
  process.exit(1);
}
