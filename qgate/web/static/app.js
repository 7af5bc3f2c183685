// qgate review: small progressive enhancements; every page works without them.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Show times in the reader's local time zone (the server renders UTC).
  // The year only when it is not this year.
  const base = { month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  const thisYear = new Intl.DateTimeFormat(undefined, base);
  const otherYear = new Intl.DateTimeFormat(undefined, { ...base, year: "numeric" });
  const now = new Date();
  for (const el of document.querySelectorAll("time[data-local]")) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) {
      el.title = el.textContent;
      el.textContent = (d.getFullYear() === now.getFullYear() ? thisYear : otherYear).format(d);
    }
  }
  // Whole worklist rows open their series (the patient cell keeps a real link).
  for (const row of document.querySelectorAll("tr[data-href]")) {
    row.addEventListener("click", (ev) => {
      if (ev.target.closest("a, button, input, select")) return;
      if (window.getSelection().toString()) return;
      window.location.href = row.dataset.href;
    });
  }
});
