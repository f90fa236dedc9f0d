-- A request ended while it waited (or never got its ticket granted): take its ticket out of the queue.
-- ARGV: 4 ticket, 5 key name, 6 request id, 7 its final record ('' none).
-- A ticket already granted is left alone: its grant is on its way to this replica, which releases it.
local ticket = ARGV[4]
local info = ticket_info(ticket)
if info and redis.call('HEXISTS', P .. ':t:' .. ticket, 'mem') == 0 then
  unqueue(info.pool, ticket, info)
  forget_ticket(ticket, CALLER)
end
forget_id(ARGV[6], ARGV[5], CALLER)
remember(ARGV[6], ARGV[5], ARGV[7])
return 1
