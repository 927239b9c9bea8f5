package org.pocusedge.core

import java.util.ArrayDeque
import java.util.concurrent.TimeUnit
import java.util.concurrent.locks.ReentrantLock

/**
 * A bounded hand-off between a probe callback (producer) and the inference loop (consumer)
 * that never blocks the producer: when full, the oldest frame is dropped. A live display wants
 * the newest frame, not a growing backlog (the Python runtime's realtime mode does the same).
 */
class DropOldestQueue<T>(val capacity: Int) {
    private val items = ArrayDeque<T>()
    private val lock = ReentrantLock()
    private val notEmpty = lock.newCondition()

    /** Frames dropped since creation. */
    var dropped = 0L
        private set

    init {
        require(capacity >= 1) { "capacity must be >= 1, got $capacity" }
    }

    fun offer(item: T) {
        lock.lock()
        try {
            if (items.size == capacity) {
                items.pollFirst()
                dropped++
            }
            items.addLast(item)
            notEmpty.signal()
        } finally {
            lock.unlock()
        }
    }

    /** The oldest queued item, waiting up to [timeoutMs]; null on timeout. */
    fun poll(timeoutMs: Long): T? {
        lock.lock()
        try {
            var nanos = TimeUnit.MILLISECONDS.toNanos(timeoutMs)
            while (items.isEmpty()) {
                if (nanos <= 0L) return null
                nanos = notEmpty.awaitNanos(nanos)
            }
            return items.pollFirst()
        } finally {
            lock.unlock()
        }
    }

    val size: Int
        get() {
            lock.lock()
            try {
                return items.size
            } finally {
                lock.unlock()
            }
        }
}
