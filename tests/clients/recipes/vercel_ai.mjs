// The Vercel AI SDK: @ai-sdk/google with baseURL `${BASE}/gemini/v1beta`, and
// @ai-sdk/openai-compatible with `${BASE}/dashscope/v1`. Dummy keys.
import { generateText, streamText } from "ai";
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import assert from "node:assert/strict";

const google = createGoogleGenerativeAI({ apiKey: "unused", baseURL: `${process.env.BASE}/gemini/v1beta` });
const g = await generateText({ model: google("gemini-2.5-flash"), prompt: "hi" });
assert.equal(g.text, "Hello from the fake Gemini.");

const dashscope = createOpenAICompatible({ name: "dashscope", apiKey: "unused", baseURL: `${process.env.BASE}/dashscope/v1` });
const d = await generateText({ model: dashscope("qwen-plus"), prompt: "hi" });
assert.equal(d.text, "Hello from the fake upstream.");
let text = "";
for await (const part of streamText({ model: dashscope("qwen-plus"), prompt: "hi" }).textStream) text += part;
assert.equal(text, "Hello, streamed.");
console.log("vercel ai ok");
