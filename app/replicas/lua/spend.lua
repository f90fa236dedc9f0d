-- A key's requests and tokens per minute, checked and taken in one step (or given back: a negative amount).
-- ARGV: 4 key name, 5 rpm (0: none), 6 tpm (0: none), 7 requests, 8 tokens, 9 '1' to take only if both fit.
-- Returns {0} when taken, else {ms until both fit, 'requests' or 'tokens'}.
local budgets = P .. ':kb:' .. ARGV[4]
local rpm, tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local requests, tokens = tonumber(ARGV[7]), tonumber(ARGV[8])
if ARGV[9] == '1' then
  local wait_r, wait_t = 0, 0
  if rpm > 0 then wait_r = bucket_wait(bucket_level(budgets, 'r', rpm), requests, rpm) end
  if tpm > 0 then wait_t = bucket_wait(bucket_level(budgets, 't', tpm), tokens, tpm) end
  if wait_r > 0 or wait_t > 0 then
    if wait_r >= wait_t then return {wait_r, 'requests'} end
    return {wait_t, 'tokens'}
  end
end
if rpm > 0 and requests ~= 0 then bucket_add(budgets, 'r', rpm, -requests) end
if tpm > 0 and tokens ~= 0 then bucket_add(budgets, 't', tpm, -tokens) end
return {0}
