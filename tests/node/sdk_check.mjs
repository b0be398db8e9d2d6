// The official openai npm package against a kandle endpoint: one call of each
// API (tests/test_node_sdk.py runs it). Usage: node sdk_check.mjs BASE_URL KEY MODEL
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });

const chat = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Name three colors." }],
  max_tokens: 8,
  temperature: 0,
});
assert.equal(chat.object, "chat.completion");
assert.ok(chat.usage.completion_tokens > 0);

const text = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0 });
assert.equal(text.object, "text_completion");
assert.ok(text.id.startsWith("cmpl-"));
assert.ok(text.usage.completion_tokens > 0 && text.usage.completion_tokens <= 6);

let streamed = "";
const stream = await client.completions.create({
  model, prompt: "Once upon a time", max_tokens: 6, temperature: 0, stream: true, echo: true, logprobs: 1,
});
for await (const chunk of stream) {
  for (const choice of chunk.choices) streamed += choice.text;
}
assert.ok(streamed.startsWith("Once upon a time"));
assert.equal(streamed, "Once upon a time" + text.choices[0].text);

const response = await client.responses.create({
  model, input: "Name three colors.", max_output_tokens: 16, temperature: 0,
});
assert.equal(response.object, "response");
assert.equal(response.output[0].type, "message");
assert.equal(typeof response.output_text, "string");
assert.equal(response.usage.total_tokens, response.usage.input_tokens + response.usage.output_tokens);

console.log("ok");
