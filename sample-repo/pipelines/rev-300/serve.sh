#!/bin/sh
# The rev-300 service: answers each TCP connection on 7000 with a riddle.
FLAG=${FLAG:-flag{not-set}}
while true; do
    echo "what is 0x12c?" | nc -l -p 7000
done
