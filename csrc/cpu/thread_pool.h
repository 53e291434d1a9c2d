// A persistent pool of worker threads for the CPU kernels: large updates are
// split across the machine's cores without spawning a thread per step.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_fused_sgd {

class ThreadPool {
 public:
  // The process-wide pool: hardware_concurrency() threads in all (the caller
  // included), or MLX_FUSED_SGD_NUM_THREADS if set.
  static ThreadPool& instance();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads that work on a job, the calling thread included.
  int num_threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Runs fn(i) for every i in [0, n), items claimed dynamically by the
  // workers and the calling thread; returns when all are done. If another
  // job holds the pool (two MLX streams stepping at once), the caller runs its
  // items itself rather than wait.
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void run_items();

  std::vector<std::thread> workers_;
  std::mutex job_mutex_; // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t next_ = 0;
  // Written under mutex_; atomic so that waiting threads can spin on them
  // briefly before sleeping (the chunks of one optimizer step arrive back to
  // back, and a futex wake-up costs tens of microseconds).
  std::atomic<int64_t> finished_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

} // namespace mlx_fused_sgd
