// Asynchronous file I/O for the NVMe tier, registered as torch.ops.loco_aio.*.
//
// A queue is either Linux AIO (io_setup/io_submit/io_getevents through syscall(2): no library
// needed; with O_DIRECT the kernel does the transfer asynchronously) or a pool of threads doing
// pread/pwrite (file systems or kernels without AIO). A request moves one contiguous CPU buffer
// to or from one file offset, split into chunks that are in flight together.
//
// Ops (schemas in TORCH_LIBRARY below):
//   open_queue(kind, depth) -> handle     kind 0: Linux AIO, 1: threads; handle < 0: -errno
//   submit(handle, fd, buf, offset, write, chunk) -> request id
//   wait(handle, request) -> bytes moved  (raises on an I/O error or a short transfer)
//   close_queue(handle) -> 0              (waits for everything in flight first)
//
// Contract: the same bytes as pread/pwrite of the whole buffer at that offset (the pure-python
// reference in loco/engine/aio.py). With O_DIRECT the caller aligns address, offset and length.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace loco_aio {
namespace {

struct Pending {
  int64_t remaining = 0;  // chunks not yet completed
  int64_t bytes = 0;      // bytes moved so far
  int64_t expected = 0;   // bytes asked for
  int error = 0;          // first errno seen (0: none)
};

struct Chunk {
  int fd;
  char* ptr;
  int64_t len;
  int64_t offset;
  bool write;
  int64_t request;
};

class Queue {
 public:
  virtual ~Queue() = default;
  int64_t submit(int fd, char* ptr, int64_t len, int64_t offset, bool write, int64_t chunk) {
    std::vector<Chunk> chunks;
    int64_t id;
    {
      std::lock_guard<std::mutex> g(mu_);
      id = next_++;
      Pending& p = pending_[id];
      p.expected = len;
      for (int64_t pos = 0; pos < len; pos += chunk) {
        int64_t n = std::min(chunk, len - pos);
        chunks.push_back({fd, ptr + pos, n, offset + pos, write, id});
      }
      p.remaining = static_cast<int64_t>(chunks.size());
    }
    if (!chunks.empty()) enqueue(chunks);
    return id;
  }
  int64_t wait(int64_t id) {
    std::unique_lock<std::mutex> lk(mu_);
    auto it = pending_.find(id);
    TORCH_CHECK(it != pending_.end(), "loco_aio: unknown request ", id);
    while (it->second.remaining > 0) {
      if (threaded_) {  // workers complete chunks on their own: sleep until ours are done
        cv_.wait(lk, [&] { return pending_[id].remaining == 0; });
        break;
      }
      lk.unlock();
      pump();
      lk.lock();
      it = pending_.find(id);
    }
    it = pending_.find(id);
    Pending p = it->second;
    pending_.erase(it);
    lk.unlock();
    TORCH_CHECK(p.error == 0, "loco_aio: I/O error: ", std::strerror(p.error));
    TORCH_CHECK(p.bytes == p.expected, "loco_aio: short transfer: ", p.bytes, " of ",
                p.expected, " bytes (file too short?)");
    return p.bytes;
  }
  void drain() {
    std::vector<int64_t> ids;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& kv : pending_) ids.push_back(kv.first);
    }
    for (int64_t id : ids) {
      try {
        wait(id);
      } catch (...) {
      }
    }
  }

 protected:
  virtual void enqueue(const std::vector<Chunk>& chunks) = 0;
  virtual void pump() = 0;  // make progress on completions (may block)
  void complete(int64_t id, int64_t res) {
    std::lock_guard<std::mutex> g(mu_);
    Pending& p = pending_[id];
    if (res < 0 && p.error == 0) p.error = static_cast<int>(-res);
    if (res > 0) p.bytes += res;
    p.remaining -= 1;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<int64_t, Pending> pending_;
  int64_t next_ = 1;
  bool threaded_ = false;
};

// ------------------------------------------------------------------ Linux AIO

class KernelQueue : public Queue {
 public:
  explicit KernelQueue(int depth) : depth_(depth) {}
  int setup() {
    ctx_ = 0;
    long r = syscall(SYS_io_setup, depth_, &ctx_);
    return r < 0 ? -errno : 0;
  }
  ~KernelQueue() override {
    drain();
    if (ctx_) syscall(SYS_io_destroy, ctx_);
  }

 protected:
  void enqueue(const std::vector<Chunk>& chunks) override {
    std::lock_guard<std::mutex> g(submit_mu_);
    for (const Chunk& c : chunks) backlog_.push_back(c);
    flush();
  }
  // Submit from the backlog while fewer than depth_ are in the kernel (submit_mu_ held).
  void flush() {
    while (!backlog_.empty() && inflight_ < depth_) {
      int n = static_cast<int>(std::min<size_t>(backlog_.size(), depth_ - inflight_));
      std::vector<iocb> cbs(n);
      std::vector<iocb*> ptrs(n);
      for (int i = 0; i < n; ++i) {
        const Chunk& c = backlog_[i];
        std::memset(&cbs[i], 0, sizeof(iocb));
        cbs[i].aio_data = static_cast<uint64_t>(c.request);
        cbs[i].aio_lio_opcode = c.write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_fildes = static_cast<uint32_t>(c.fd);
        cbs[i].aio_buf = reinterpret_cast<uint64_t>(c.ptr);
        cbs[i].aio_nbytes = static_cast<uint64_t>(c.len);
        cbs[i].aio_offset = c.offset;
        ptrs[i] = &cbs[i];
      }
      long r = syscall(SYS_io_submit, ctx_, n, ptrs.data());
      if (r < 0) {
        if (errno == EAGAIN && inflight_ > 0) return;  // retry after completions
        int err = errno;
        for (int i = 0; i < n; ++i) complete(backlog_[i].request, -err);
        backlog_.erase(backlog_.begin(), backlog_.begin() + n);
        continue;
      }
      backlog_.erase(backlog_.begin(), backlog_.begin() + r);  // the kernel copied the iocbs
      inflight_ += static_cast<int>(r);
    }
  }
  void pump() override {
    std::lock_guard<std::mutex> g(submit_mu_);
    if (inflight_ == 0) {
      flush();
      if (inflight_ == 0) return;
    }
    std::vector<io_event> ev(depth_);
    long r;
    do {
      r = syscall(SYS_io_getevents, ctx_, 1, depth_, ev.data(), nullptr);
    } while (r < 0 && errno == EINTR);
    TORCH_CHECK(r >= 0, "loco_aio: io_getevents failed: ", std::strerror(errno));
    inflight_ -= static_cast<int>(r);
    for (long i = 0; i < r; ++i) complete(static_cast<int64_t>(ev[i].data), ev[i].res);
    flush();
  }

 private:
  int depth_;
  aio_context_t ctx_ = 0;
  std::mutex submit_mu_;
  std::deque<Chunk> backlog_;
  int inflight_ = 0;
};

// ------------------------------------------------------------------ thread pool

class ThreadQueue : public Queue {
 public:
  explicit ThreadQueue(int threads) {
    threaded_ = true;
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  }
  ~ThreadQueue() override {
    {
      std::lock_guard<std::mutex> g(work_mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

 protected:
  void enqueue(const std::vector<Chunk>& chunks) override {
    {
      std::lock_guard<std::mutex> g(work_mu_);
      for (const Chunk& c : chunks) work_.push_back(c);
    }
    work_cv_.notify_all();
  }
  void pump() override {}  // never called: wait() sleeps on the condition instead

 private:
  static int64_t transfer(const Chunk& c) {
    int64_t done = 0;
    while (done < c.len) {
      ssize_t r = c.write ? pwrite(c.fd, c.ptr + done, c.len - done, c.offset + done)
                          : pread(c.fd, c.ptr + done, c.len - done, c.offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return -errno;
      if (r == 0) break;  // end of file: a short read
      done += r;
    }
    return done;
  }
  void run() {
    for (;;) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lk(work_mu_);
        work_cv_.wait(lk, [this] { return stop_ || !work_.empty(); });
        if (work_.empty()) return;
        c = work_.front();
        work_.pop_front();
      }
      complete(c.request, transfer(c));
    }
  }
  std::mutex work_mu_;
  std::condition_variable work_cv_;
  std::deque<Chunk> work_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

// ------------------------------------------------------------------ registry and ops

std::mutex g_mu;
std::unordered_map<int64_t, std::shared_ptr<Queue>> g_queues;
int64_t g_next = 1;

std::shared_ptr<Queue> get(int64_t handle) {
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_queues.find(handle);
  TORCH_CHECK(it != g_queues.end(), "loco_aio: unknown queue ", handle);
  return it->second;
}

int64_t open_queue(int64_t kind, int64_t depth) {
  TORCH_CHECK(depth >= 1 && depth <= 4096, "loco_aio: depth must be in [1, 4096]");
  TORCH_CHECK(kind == 0 || kind == 1, "loco_aio: kind must be 0 (aio) or 1 (threads)");
  std::shared_ptr<Queue> q;
  if (kind == 0) {
    auto k = std::make_shared<KernelQueue>(static_cast<int>(depth));
    int r = k->setup();
    if (r < 0) return r;
    q = k;
  } else {
    q = std::make_shared<ThreadQueue>(static_cast<int>(std::min<int64_t>(depth, 16)));
  }
  std::lock_guard<std::mutex> g(g_mu);
  int64_t h = g_next++;
  g_queues[h] = q;
  return h;
}

int64_t submit(int64_t handle, int64_t fd, const at::Tensor& buf, int64_t offset, bool write,
               int64_t chunk) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "loco_aio: a contiguous CPU buffer");
  TORCH_CHECK(chunk >= 512 && offset >= 0 && fd >= 0, "loco_aio: bad chunk, offset or fd");
  int64_t len = buf.numel() * buf.element_size();
  char* ptr = static_cast<char*>(buf.data_ptr());
  return get(handle)->submit(static_cast<int>(fd), ptr, len, offset, write, chunk);
}

int64_t wait(int64_t handle, int64_t request) { return get(handle)->wait(request); }

int64_t close_queue(int64_t handle) {
  std::shared_ptr<Queue> q;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_queues.find(handle);
    if (it == g_queues.end()) return 0;
    q = it->second;
    g_queues.erase(it);
  }
  q->drain();
  return 0;
}

}  // namespace
}  // namespace loco_aio

TORCH_LIBRARY(loco_aio, m) {
  m.def("open_queue(int kind, int depth) -> int", &loco_aio::open_queue);
  m.def("submit(int handle, int fd, Tensor buf, int offset, bool write, int chunk) -> int",
        &loco_aio::submit);
  m.def("wait(int handle, int request) -> int", &loco_aio::wait);
  m.def("close_queue(int handle) -> int", &loco_aio::close_queue);
}
