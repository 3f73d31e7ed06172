-- Argo CD health check for lorakube.io/LoRATrainingJob (argocd-cm key
-- resource.customizations.health.lorakube.io_LoRATrainingJob; see README.md next to this file).
--
-- Reads only what the lorakube operator and the trainer write into the job's status: phase,
-- the condition of the phase (reason, message), observedGeneration, progress.text, readyNodes,
-- attempt, restarts, lastFailure and progress.staging. Argo CD runs custom health scripts without Lua's string and
-- math libraries, so this script uses only the base and table libraries (`..`, tostring,
-- table.concat); the tests run it in the same environment.

local hs = {}

-- The condition of `kind`, or nil.
local function condition(status, kind)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message" of the phase's condition when it is True (just the message when the reason
-- only repeats the phase), else `fallback`.
local function explain(status, kind, fallback)
  local c = condition(status, kind)
  if c == nil or c.status ~= "True" then
    return fallback
  end
  local text = c.message or fallback
  if c.reason ~= nil and c.reason ~= "" and c.reason ~= kind then
    return c.reason .. ": " .. text
  end
  return text
end

-- "step 40/120, loss 0.52" from what rank 0 reported, or nil before its first report.
local function progress(status)
  local p = status.progress
  if type(p) ~= "table" then
    return nil
  end
  local text = p.text
  if text == nil and p.step ~= nil and p.totalSteps ~= nil then
    text = tostring(p.step) .. "/" .. tostring(p.totalSteps)
  end
  if text == nil then
    return nil
  end
  text = "step " .. text
  if p.loss ~= nil then
    text = text .. ", loss " .. tostring(p.loss)
  end
  return text
end

-- "attempt 2 (1 restart)" when the gang has restarted, else nil.
local function attempts(status)
  local restarts = (tonumber(status.restarts) or 0) + (tonumber(status.disruptions) or 0)
  if restarts == 0 then
    return nil
  end
  local noun = " restarts"
  if restarts == 1 then
    noun = " restart"
  end
  return "attempt " .. tostring(status.attempt or "?") .. " (" .. tostring(restarts) .. noun .. ")"
end

local function join(parts)
  return table.concat(parts, "; ")
end

local function add(parts, part)
  if part ~= nil and part ~= "" then
    parts[#parts + 1] = part
  end
end

local status = obj.status
if type(status) ~= "table" or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the lorakube operator to accept the job (no status yet). If this lasts, "
    .. "check that the operator runs and watches this namespace."
  return hs
end

-- A spec change the operator has not acted on yet: whatever the phase says is about the old spec.
local generation = obj.metadata and tonumber(obj.metadata.generation)
local observed = tonumber(status.observedGeneration)
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the lorakube operator to act on generation " .. tostring(generation)
    .. " of the spec (status is from generation " .. tostring(observed) .. ", phase "
    .. tostring(status.phase) .. ")"
  return hs
end

local phase = status.phase
local parts = {}

if phase == "Succeeded" then
  hs.status = "Healthy"
  add(parts, explain(status, "Succeeded", "all pods exited 0"))
  add(parts, progress(status))
  if type(status.artifacts) == "table" and #status.artifacts > 0 then
    add(parts, tostring(#status.artifacts) .. " artifacts published (status.artifacts)")
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  add(parts, explain(status, "Failed", "the job failed"))
  local failure = status.lastFailure
  if type(failure) == "table" and failure.logTail ~= nil then
    add(parts, "the failed pod's last log lines are in status.lastFailure.logTail")
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  add(parts, explain(status, "Suspended", "spec.runPolicy.suspend is true"))
  add(parts, "set spec.runPolicy.suspend to false to resume")
elseif phase == "Pending" then
  hs.status = "Progressing"
  local resumed = condition(status, "Suspended")
  if resumed ~= nil and resumed.status == "False" and resumed.reason == "Resumed" then
    add(parts, "resuming after suspension (" .. tostring(resumed.message) .. ")")
  end
  add(parts, "waiting for the operator to create the pods of attempt " .. tostring(status.attempt or 1))
elseif phase == "Created" then
  hs.status = "Progressing"
  add(parts, explain(status, "Created", "pods created"))
  add(parts, "waiting for every pod to run (" .. tostring(status.readyNodes or "?") .. " running)")
  add(parts, attempts(status))
elseif phase == "Staging" then
  hs.status = "Progressing"
  add(parts, explain(status, "Staging", "rank 0 stages the inputs into its node's cache"))
  -- progress.text is rank 0's "model 120.4/340.2 MiB" while its report is of this attempt
  local p = status.progress
  if type(p) == "table" and type(p.staging) == "table" and p.text ~= nil
      and tostring(p.staging.attempt) == tostring(status.attempt) then
    add(parts, tostring(p.text))
  end
  add(parts, attempts(status))
elseif phase == "Running" then
  hs.status = "Progressing"
  local reported = progress(status)
  if reported ~= nil then
    add(parts, reported)
  else
    add(parts, explain(status, "Running", "all pods are running"))
    add(parts, "waiting for the first progress report")
  end
  add(parts, attempts(status))
elseif phase == "Restarting" then
  hs.status = "Progressing"
  add(parts, explain(status, "Restarting", "after a retryable failure"))
  local reported = progress(status)
  if reported ~= nil then
    add(parts, "last report before the restart: " .. reported)
  end
else
  hs.status = "Unknown"
  add(parts, "unrecognised phase; this health check may be older than the operator")
end

hs.message = phase .. ": " .. join(parts)
return hs
