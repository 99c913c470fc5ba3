// DarkGPU console: copy buttons. A button with data-copy="ID" copies the text of #ID.
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  const text = source.textContent.trim();
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (_) {
    // No clipboard access: select the text so that Ctrl+C / long-press copies it.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 3000);
});

// A button with data-print prints the page (a receipt).
document.addEventListener("click", (event) => {
  if (event.target.closest("button[data-print]")) window.print();
});
