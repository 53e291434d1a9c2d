#include "thread_pool.h"

#include <chrono>
#include <cstdlib>

namespace mlx_fused_sgd {

namespace {

// How long an idle thread spins before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(50);

template <typename Ready> void spin_until(Ready ready) {
  auto deadline = std::chrono::steady_clock::now() + kSpin;
  while (!ready() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
}

} // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool([] {
    if (const char* env = std::getenv("MLX_FUSED_SGD_NUM_THREADS")) {
      int n = std::atoi(env);
      if (n >= 1) {
        return n;
      }
    }
    int n = static_cast<int>(std::thread::hardware_concurrency());
    return n >= 1 ? n : 1;
  }());
  return pool;
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) {
    w.join();
  }
}

// Claims items under the lock; each item is large (tens of microseconds), so
// the lock is cheap next to the work.
void ThreadPool::run_items() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (next_ < n_) {
    int64_t i = next_++;
    const auto* fn = fn_;
    lock.unlock();
    (*fn)(i);
    lock.lock();
    if (++finished_ == n_) {
      done_.notify_all();
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    spin_until([&] { return stop_ || generation_.load() != seen; });
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) {
        return;
      }
      seen = generation_;
    }
    run_items();
  }
}

void ThreadPool::parallel_for(
    int64_t n, const std::function<void(int64_t)>& fn) {
  std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
  if (n <= 1 || workers_.empty() || !job.owns_lock()) {
    for (int64_t i = 0; i < n; ++i) {
      fn(i);
    }
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    finished_ = 0;
    ++generation_;
  }
  wake_.notify_all();
  run_items();
  spin_until([&] { return finished_.load() == n; });
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return finished_ == n_; });
  fn_ = nullptr;
  n_ = 0;
}

} // namespace mlx_fused_sgd
