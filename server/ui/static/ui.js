// tinymlaas dashboard: live progress without reloading, and the search's Pareto front as an SVG chart.
"use strict";

function poll(card, render) {
  const url = card.dataset.statusUrl;
  const tick = async () => {
    let body;
    try {
      const r = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (r.status === 401) { location.reload(); return; }
      body = await r.json();
    } catch (e) { setTimeout(tick, 2000); return; }
    if (render(body)) setTimeout(tick, 1000);
  };
  setTimeout(tick, 500);
}

function text(id, value) { const el = document.getElementById(id); if (el) el.textContent = value; }

function watchBuild() {
  const card = document.getElementById("progress-card");
  const open = JSON.parse(card ? card.dataset.open : "[]");  // the states of a build still in the works
  if (!card || !open.includes(card.dataset.state)) return;
  poll(card, (b) => {
    text("build-state", b.state);
    document.getElementById("build-state").className = "status " + b.state;
    text("build-stage", b.stage || "-");
    document.getElementById("build-progress").value = b.progress;
    text("build-percent", Math.round(b.progress * 100) + "%");
    text("build-message", b.message || "");
    if (open.includes(b.state)) return true;
    location.reload();  // the report is drawn by the server
    return false;
  });
}

function watchRollout() {
  const card = document.getElementById("rollout-card");
  if (!card || card.dataset.state !== "in_progress") return;
  let seen = "";
  poll(card, (d) => {
    text("rollout-state", d.state);
    text("rollout-reason", d.reason || "");
    const now = JSON.stringify([d.jobs, d.events]);
    if (d.state !== "in_progress" || (seen && now !== seen)) { location.reload(); return false; }
    seen = now;
    return true;
  });
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function drawFront() {
  const box = document.getElementById("front-chart");
  if (!box) return;
  const data = JSON.parse(box.dataset.front);
  const pts = data.points;
  if (!pts.length) return;
  const W = 760, H = 380, L = 96, R = 24, T = 28, B = 48;
  const pad = (lo, hi) => (hi > lo ? [lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)] : [lo * 0.95, hi * 1.05 + 1]);
  const [x0, x1] = pad(Math.min(...pts.map((p) => p.flash)), Math.max(...pts.map((p) => p.flash)));
  const [y0, y1] = pad(Math.min(...pts.map((p) => p.cost)), Math.max(...pts.map((p) => p.cost)));
  const sx = (v) => L + (v - x0) / (x1 - x0) * (W - L - R);
  const sy = (v) => H - B - (v - y0) / (y1 - y0) * (H - T - B);
  const chart = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  const label = (x, y, s, anchor) => {
    const t = svg("text", {x, y, "font-size": 11, fill: "#475467", "text-anchor": anchor || "start"});
    t.textContent = s;
    chart.appendChild(t);
  };
  for (let k = 0; k <= 4; k++) {  // grid and ticks
    const xv = x0 + k * (x1 - x0) / 4, yv = y0 + k * (y1 - y0) / 4;
    chart.appendChild(svg("line", {x1: sx(xv), y1: T, x2: sx(xv), y2: H - B, stroke: "#f2f4f7"}));
    chart.appendChild(svg("line", {x1: L, y1: sy(yv), x2: W - R, y2: sy(yv), stroke: "#f2f4f7"}));
    label(sx(xv), H - B + 16, Math.round(xv).toLocaleString(), "middle");
    label(L - 6, sy(yv) + 4, Math.round(yv).toLocaleString(), "end");
  }
  chart.appendChild(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#98a2b3"}));
  chart.appendChild(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#98a2b3"}));
  label((L + W - R) / 2, H - 8, "flash (bytes)", "middle");
  label(L, T - 10, `${data.cost_kind} per inference`, "start");
  const tip = document.createElement("p");
  tip.id = "front-tip";
  tip.className = "hint";
  tip.textContent = "Hover a point.";
  const front = new Set(data.front);
  for (const p of pts) {
    const chosen = p.i === data.chosen;
    const c = svg("circle", {cx: sx(p.flash), cy: sy(p.cost), r: chosen ? 8 : 5,
                             fill: chosen ? "#d92d20" : front.has(p.i) ? "#2f6fde" : "#98a2b3",
                             stroke: front.has(p.i) ? "#101828" : "none", "data-index": p.i, class: "front-point"});
    const title = svg("title", {});
    title.textContent = `${p.label}: ${p.cost.toLocaleString()} ${data.cost_kind}, flash ${p.flash.toLocaleString()} B, `
      + `RAM ${p.ram.toLocaleString()} B` + (p.accuracy != null ? `, accuracy ${p.accuracy.toFixed(4)}` : "")
      + (chosen ? " (chosen)" : front.has(p.i) ? " (on the front)" : "");
    c.appendChild(title);
    c.addEventListener("mouseenter", () => { tip.textContent = title.textContent; });
    c.addEventListener("click", () => {
      text("front-picked", `picked: ${title.textContent}\n` + (chosen ? "(this build)\n" : "")
        + JSON.stringify(p.variant, null, 1));
      const point = document.getElementById("pick-point"), button = document.getElementById("build-picked");
      if (point && button) { point.value = p.i; button.disabled = chosen; }
    });
    chart.appendChild(c);
  }
  box.appendChild(chart);
  box.appendChild(tip);
}

document.addEventListener("DOMContentLoaded", () => { watchBuild(); watchRollout(); drawFront(); });
