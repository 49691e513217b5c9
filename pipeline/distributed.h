// Data parallelism over PyTorch's c10d: the process group (Gloo for CPU tensors, NCCL for CUDA
// tensors, rendezvous through a TCPStore on MASTER_ADDR:MASTER_PORT), the gradient
// synchronisation LibTorch's C++ API does not have (DistributedDataParallel is Python), the
// data split every rank agrees on, and the launcher of local workers (caption-train --nproc).
//
// Environment read (the first launcher found wins; its variables must be complete):
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   mpirun     OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK/_LOCAL_SIZE (Open MPI) or PMI_RANK/PMI_SIZE
//              (MPICH, Intel MPI); MASTER_ADDR and MASTER_PORT from the environment
//   Slurm      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE; MASTER_ADDR and
//              MASTER_PORT from the environment
// MASTER_PORT defaults to 29500, MASTER_ADDR to 127.0.0.1 (one machine).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/Tensor.h>

namespace prefixcap {

// A collective failed: a peer rank died, or did not answer within the timeout.
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string launcher = "none";  // torchrun | mpirun | slurm | none

  bool distributed() const { return world_size > 1; }
  // Reads the variables above; throws ConfigError naming a malformed or inconsistent one
  // (RANK without WORLD_SIZE, a rank outside [0, WORLD_SIZE), a port outside 1..65535, ...).
  static DistEnv from_environment();
  // As above from an explicit variable table (tests).
  static DistEnv from_variables(const std::function<const char*(const char*)>& getenv);
  std::string describe() const;  // "rank 1 of 2 (local 1 of 2, torchrun, 127.0.0.1:29500)"
  // Compute threads for one rank when none were asked for: this machine's cores shared by its ranks.
  int threads_per_rank() const;
};

// One process group. Collectives are blocking unless named _async; every failure (a peer gone,
// the timeout) is rethrown as DistributedError naming the collective and this rank.
class Communicator {
 public:
  // backend: "gloo" (CPU tensors) | "nccl" (CUDA tensors; needs a LibTorch built with NCCL).
  // Waits up to `timeout` for every rank to join; later collectives fail after `timeout` too.
  static std::unique_ptr<Communicator> create(const DistEnv& env, const std::string& backend,
                                              std::chrono::milliseconds timeout);
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& backend() const = 0;

  // In-place sum over ranks; the handle's wait() blocks until done (and rethrows failures).
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };
  virtual std::unique_ptr<Pending> allreduce_sum_async(at::Tensor& t) = 0;
  void allreduce_sum(at::Tensor& t) { allreduce_sum_async(t)->wait(); }
  // Every rank's tensors become the root's (same shapes and dtypes on every rank).
  virtual void broadcast(std::vector<at::Tensor>& ts, int root = 0) = 0;
  // Byte strings of any length from every rank, in rank order.
  virtual std::vector<std::string> allgather_bytes(const std::string& mine) = 0;
  virtual void barrier() = 0;

  // Payload bytes this rank handed to collectives so far (all-reduce, broadcast, gather).
  int64_t payload_bytes() const { return payload_bytes_; }

 protected:
  int64_t payload_bytes_ = 0;
};

// Gradient synchronisation for synchronous data parallelism (what DDP's reducer does): the
// trainable parameters are put in buckets of about `bucket_bytes` (in reverse order, the order
// in which backward produces their gradients); with `overlap`, a hook on each parameter's
// gradient accumulator starts a bucket's all-reduce as soon as its last gradient is in, while
// backward goes on with the earlier layers. Buckets start in the same order on every rank,
// which the collectives need: bucket k waits for buckets < k. finish() starts what backward
// did not (parameters that got no gradient count as zero), waits for all, and writes the sums
// back into .grad. The sum, not the mean: the trainer's loss is already divided by the global
// token count. Without `overlap` every bucket starts in finish(), after backward (the baseline
// the overlap gain is measured against).
class GradientSync {
 public:
  GradientSync(Communicator& comm, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap);
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // Before the backward of each micro-batch: `last` is true for the last one of an optimizer
  // step (the earlier ones only accumulate, as DDP's no_sync).
  void prepare(bool last);
  // After the last micro-batch's backward: every gradient summed over the ranks.
  void finish();

  size_t num_buckets() const;
  int64_t bytes_per_step() const;  // gradient payload all-reduced per optimizer step
  // Buckets whose all-reduce started inside backward in the last step (0 without overlap).
  int64_t started_in_backward() const { return started_in_backward_; }

 private:
  struct Bucket;
  void ready(size_t param);
  void launch(size_t bucket);

  Communicator& comm_;
  std::vector<at::Tensor> params_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::vector<size_t> bucket_of_;
  struct Hook;
  std::vector<Hook> hooks_;
  bool overlap_;
  bool armed_ = false;
  size_t next_launch_ = 0;
  int64_t started_in_backward_ = 0;
};

// The part of `n` items (in a fixed order) that `rank` of `world` takes: the contiguous block
// [lo, hi) with the first n % world ranks one item longer. Every item is taken exactly once;
// a rank may get none when n < world.
struct Span {
  int64_t lo = 0, hi = 0;
  int64_t size() const { return hi - lo; }
};
Span rank_span(int64_t n, int rank, int world);

// A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT).
int free_local_port();

// caption-train --nproc N: runs argv (this program, without --nproc) N times with the torchrun
// variables set (MASTER_ADDR 127.0.0.1, a free MASTER_PORT unless set), forwards SIGINT and
// SIGTERM, and when a worker fails stops the others (SIGTERM, then SIGKILL after `grace`).
// Returns the first failing worker's exit status (128 + signal for a signal), else 0.
int run_local_workers(const std::vector<std::string>& argv, int nproc, std::chrono::seconds grace = std::chrono::seconds(10));

}  // namespace prefixcap
