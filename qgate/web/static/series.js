// Series page: slice scroller over the quality maps, thumbnails, strip-plot cursor.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const viewer = document.querySelector("[data-viewer]");
  if (!viewer) return;
  const urls = viewer.dataset.urls.split(" ");
  const slices = viewer.dataset.slices.split(" ").map(Number);
  const total = Number(viewer.dataset.total) || urls.length;
  const img = document.getElementById("map-image");
  const range = document.getElementById("slice-range");
  const label = document.getElementById("slice-label");
  const thumbs = Array.from(viewer.querySelectorAll(".thumb"));
  const strips = Array.from(document.querySelectorAll("svg[data-strip]"));
  const cache = new Map();
  let current = 0;

  function preload(k) {
    if (k < 0 || k >= urls.length || cache.has(k)) return;
    const im = new Image();
    im.src = urls[k];
    cache.set(k, im);
  }

  function show(k) {
    k = Math.max(0, Math.min(urls.length - 1, k));
    current = k;
    img.src = urls[k];
    img.alt = `Quality map over CT slice ${slices[k] + 1}`;
    range.value = String(k);
    label.textContent = `Slice ${slices[k] + 1} / ${total}`;
    let nearest = null;
    for (const t of thumbs) {
      const idx = Number(t.dataset.index);
      t.classList.remove("active");
      if (nearest === null || Math.abs(idx - k) < Math.abs(Number(nearest.dataset.index) - k)) nearest = t;
    }
    if (nearest) {
      nearest.classList.add("active");
      nearest.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
    for (const svg of strips) {
      const x = Number(svg.dataset.left) + (slices[k] + 0.5) * Number(svg.dataset.step);
      const cursor = svg.querySelector(".cursor");
      cursor.setAttribute("x1", x);
      cursor.setAttribute("x2", x);
    }
    preload(k + 1);
    preload(k - 1);
  }

  range.addEventListener("input", () => show(Number(range.value)));
  for (const b of viewer.querySelectorAll("[data-step]")) {
    b.addEventListener("click", () => show(current + Number(b.dataset.step)));
  }
  for (const t of thumbs) t.addEventListener("click", () => show(Number(t.dataset.index)));
  for (const svg of strips) {
    svg.addEventListener("click", (ev) => {
      const bar = ev.target.closest("[data-slice]");
      if (!bar) return;
      const k = slices.indexOf(Number(bar.dataset.slice));
      if (k >= 0) show(k);
      else show(slices.findIndex((s) => s >= Number(bar.dataset.slice)));
    });
  }
  img.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    show(current + (ev.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, textarea, select")) return;
    const steps = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, PageDown: 10, PageUp: -10 };
    if (ev.key in steps) show(current + steps[ev.key]);
    else if (ev.key === "Home") show(0);
    else if (ev.key === "End") show(urls.length - 1);
    else return;
    ev.preventDefault();
  });
  preload(1);
});
