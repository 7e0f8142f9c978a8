// @google/genai (JavaScript): base URL `${BASE}/gemini`, a dummy key.
import { GoogleGenAI } from "@google/genai";
import assert from "node:assert/strict";

const ai = new GoogleGenAI({ apiKey: "unused", httpOptions: { baseUrl: `${process.env.BASE}/gemini` } });
const reply = await ai.models.generateContent({ model: "gemini-2.5-flash", contents: "hi" });
assert.equal(reply.text, "Hello from the fake Gemini.");
let text = "";
for await (const chunk of await ai.models.generateContentStream({ model: "gemini-2.5-flash", contents: "hi" })) {
  text += chunk.text ?? "";
}
assert.equal(text, "Hello, streamed Gemini.");
console.log("genai js ok");
