// tandem console: live job progress and typed-confirmation buttons. The pages work
// without this file; it only makes them livelier.
"use strict";

// Typed confirmations: a form's submit button stays disabled until every confirmation
// field holds its phrase; a later field is enabled only once the earlier one matches
// ("DATA LOSS", then "OVERWRITE OTHER APPS"). The server checks the phrases anyway.
function wireConfirmations(form) {
  const fields = Array.from(form.querySelectorAll("input[data-confirm]"));
  if (!fields.length) return;
  const button = form.querySelector("button[type=submit]");
  const update = () => {
    let ok = true;
    for (const field of fields) {
      field.disabled = !ok;
      ok = ok && field.value.trim() === field.dataset.confirm;
    }
    button.disabled = !ok;
  };
  fields.forEach((f) => f.addEventListener("input", update));
  update();
}

// A job's page: poll its status; reload when it ends (the server then returns to the
// app's timeline if the job succeeded).
function followJob(box) {
  if (box.dataset.active !== "yes") return;
  const tick = async () => {
    try {
      const r = await fetch(box.dataset.statusUrl, { credentials: "same-origin" });
      if (r.status === 200) {
        const doc = await r.json();
        for (const [key, value] of Object.entries(doc)) {
          const el = box.querySelector(`[data-field="${key}"]`);
          if (!el) continue;
          if (el.tagName === "PROGRESS") { el.value = value ?? 0; el.textContent = `${value ?? 0}%`; }
          else el.textContent = value;
        }
        if (!doc.active) { window.location.reload(); return; }
      } else if (r.redirected || r.status === 401) { window.location.reload(); return; }
    } catch (e) { /* the appliance may be restarting: try again */ }
    setTimeout(tick, 1000);
  };
  setTimeout(tick, 500);
}

// The Monitor: refresh the rows while the page is open.
function followRows(tbody) {
  const tick = async () => {
    try {
      const r = await fetch(tbody.dataset.live, { credentials: "same-origin" });
      if (r.status === 200 && !r.redirected) tbody.innerHTML = await r.text();
    } catch (e) { /* try again */ }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form").forEach(wireConfirmations);
  const job = document.getElementById("job");
  if (job) followJob(job);
  document.querySelectorAll("tbody[data-live]").forEach(followRows);
});
