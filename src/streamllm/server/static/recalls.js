// What a session's memory holds and what a reply recalled from it, for the chat page (app.js calls these).
// The snippets are the conversation's own text, the model's included, so they too are only ever set as textContent.
"use strict";

function tokensAgo(n) {
  return `said ${n.toLocaleString("en-US")} token${n === 1 ? "" : "s"} ago`;
}

// The blocks a reply's prompt recalled, folded under the reply: null when there is nothing to show.
function recallSection(recalls) {
  if (!Array.isArray(recalls) || recalls.length === 0) return null;
  const li = document.createElement("li");
  li.className = "recalls";
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = `Recalled from memory: ${recalls.length} block${recalls.length === 1 ? "" : "s"}`;
  const list = document.createElement("ol");
  for (const r of recalls) {
    const item = document.createElement("li");
    const when = document.createElement("span");
    when.className = "ago";
    when.textContent = tokensAgo(r.tokens_ago);
    when.title = `tokens ${r.start.toLocaleString("en-US")} to ${(r.end - 1).toLocaleString("en-US")}; ` +
      `chosen by ${Math.round(100 * r.layers)}% of memory layers`;
    const text = document.createElement("q");
    text.textContent = r.text || "(its text was not kept)";
    item.append(when, text);
    list.append(item);
  }
  details.append(summary, list);
  // Opened under the last reply, the list would fall below the fold of the conversation: bring it into view.
  details.addEventListener("toggle", () => {
    if (details.open) li.scrollIntoView({ block: "nearest" });
  });
  li.append(details);
  return li;
}

// Put a reply's recall section right after it (replacing one already there).
function showRecalls(reply, recalls) {
  const next = reply.nextElementSibling;
  if (next && next.classList.contains("recalls")) next.remove();
  const section = recallSection(recalls);
  if (section) reply.after(section);
}

// The stats line for the memory: blocks and tokens held, hidden for a session without one.
function showMemory(info) {
  const memory = info && info.memory;
  document.getElementById("memory-stat").hidden = !memory;
  if (!memory) return;
  const blocks = memory.blocks || 0;
  document.getElementById("stat-memory").textContent = `${blocks.toLocaleString("en-US")} block` +
    `${blocks === 1 ? "" : "s"} (${(memory.tokens || 0).toLocaleString("en-US")} tokens)`;
}
