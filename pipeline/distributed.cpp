#include "pipeline/distributed.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <thread>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef PREFIXCAP_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "core/errors.h"
#include "core/threads.h"

namespace prefixcap {

// ---------------------------------------------------------------------------------------
// environment

namespace {

int parse_int(const char* name, const char* text, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (errno || end == text || *end != '\0' || v < lo || v > hi)
    throw ConfigError(std::string("environment variable ") + name + "='" + text + "' is not an integer in [" + std::to_string(lo) +
                      ", " + std::to_string(hi) + "]");
  return static_cast<int>(v);
}

}  // namespace

DistEnv DistEnv::from_variables(const std::function<const char*(const char*)>& getenv) {
  auto get = [&](const char* k) -> std::optional<std::string> {
    const char* v = getenv(k);
    if (!v || !*v) return std::nullopt;
    return std::string(v);
  };
  DistEnv e;
  struct Names {
    const char *launcher, *rank, *size, *local_rank, *local_size;
  };
  const Names launchers[] = {
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
      // srun's step variables, not sbatch's SLURM_NTASKS: a batch script itself is no rank.
      {"slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"},
  };
  const Names* found = nullptr;
  for (const auto& n : launchers) {
    const bool r = get(n.rank).has_value(), s = get(n.size).has_value();
    if (!r && !s) continue;
    if (std::string(n.launcher) == "slurm" && !s) continue;  // SLURM_PROCID of sbatch's script, not of an srun task
    if (r != s)
      throw ConfigError(std::string("environment: ") + (r ? n.rank : n.size) + " is set but " + (r ? n.size : n.rank) +
                        " is not (both come from the launcher, " + n.launcher + ")");
    found = &n;
    break;
  }
  if (!found) return e;
  e.launcher = found->launcher;
  e.world_size = parse_int(found->size, get(found->size)->c_str(), 1, 1 << 20);
  e.rank = parse_int(found->rank, get(found->rank)->c_str(), 0, e.world_size - 1);
  e.local_rank = e.rank;
  e.local_world_size = e.world_size;
  if (auto v = get(found->local_size)) {
    // Slurm writes "2(x3)" for 2 tasks on each of 3 nodes, or "2,1" for uneven nodes.
    std::string s = *v;
    const size_t cut = s.find_first_not_of("0123456789");
    if (e.launcher == "slurm" && cut != std::string::npos) s = s.substr(0, cut);
    e.local_world_size = parse_int(found->local_size, s.c_str(), 1, e.world_size);
  }
  if (auto v = get(found->local_rank)) e.local_rank = parse_int(found->local_rank, v->c_str(), 0, e.local_world_size - 1);
  else if (e.local_world_size != e.world_size) throw ConfigError(std::string("environment: ") + found->local_rank + " is not set");
  const auto addr = get("MASTER_ADDR");
  if (addr) e.master_addr = *addr;
  else if (e.world_size > e.local_world_size)
    throw ConfigError("environment: MASTER_ADDR is not set; with ranks on several machines it must name rank 0's host");
  if (auto p = get("MASTER_PORT")) e.master_port = parse_int("MASTER_PORT", p->c_str(), 1, 65535);
  return e;
}

DistEnv DistEnv::from_environment() {
  return from_variables([](const char* k) { return std::getenv(k); });
}

std::string DistEnv::describe() const {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world_size) + " (local " + std::to_string(local_rank) + " of " +
         std::to_string(local_world_size) + ", " + launcher + ", " + master_addr + ":" + std::to_string(master_port) + ")";
}

int DistEnv::threads_per_rank() const { return std::max(1, available_cores() / local_world_size); }

Span rank_span(int64_t n, int rank, int world) {
  const int64_t base = n / world, extra = n % world;
  Span s;
  s.lo = rank * base + std::min<int64_t>(rank, extra);
  s.hi = s.lo + base + (rank < extra ? 1 : 0);
  return s;
}

// ---------------------------------------------------------------------------------------
// the process group

namespace {

template <class Backend>
class C10dCommunicator : public Communicator {
 public:
  C10dCommunicator(const DistEnv& env, std::string backend, c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<Backend> pg,
                   at::Device device, std::chrono::milliseconds timeout)
      : env_(env), backend_(std::move(backend)), store_(std::move(store)), pg_(std::move(pg)), device_(device), timeout_(timeout) {}

  int rank() const override { return env_.rank; }
  int size() const override { return env_.world_size; }
  const std::string& backend() const override { return backend_; }

  class Handle : public Pending {
   public:
    Handle(const C10dCommunicator* owner, c10::intrusive_ptr<c10d::Work> work, const char* what, at::Tensor comm, at::Tensor user)
        : owner_(owner), work_(std::move(work)), what_(what), comm_(std::move(comm)), user_(std::move(user)) {}
    void wait() override {
      if (!work_) return;
      owner_->wait(work_, what_);
      work_.reset();
      if (!comm_.is_same(user_)) user_.copy_(comm_);
    }

   private:
    const C10dCommunicator* owner_;
    c10::intrusive_ptr<c10d::Work> work_;
    const char* what_;
    at::Tensor comm_, user_;
  };

  std::unique_ptr<Pending> allreduce_sum_async(at::Tensor& t) override {
    payload_bytes_ += static_cast<int64_t>(t.numel() * t.element_size());
    at::Tensor c = on_device(t);
    std::vector<at::Tensor> ts = {c};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    auto work = guard("all-reduce", [&] { return pg_->allreduce(ts, o); });
    return std::make_unique<Handle>(this, std::move(work), "all-reduce", c, t);
  }

  void broadcast(std::vector<at::Tensor>& ts, int root) override {
    for (auto& t : ts) {
      payload_bytes_ += static_cast<int64_t>(t.numel() * t.element_size());
      at::Tensor c = on_device(t.is_contiguous() ? t : t.contiguous());
      std::vector<at::Tensor> one = {c};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      wait(guard("broadcast", [&] { return pg_->broadcast(one, o); }), "broadcast");
      if (!c.is_same(t)) t.copy_(c);
    }
  }

  std::vector<std::string> allgather_bytes(const std::string& mine) override {
    at::Tensor len = at::full({1}, static_cast<int64_t>(mine.size()), at::kLong);
    std::vector<at::Tensor> lens = gather(len);
    int64_t longest = 0;
    for (const auto& l : lens) longest = std::max(longest, l.item<int64_t>());
    at::Tensor buf = at::zeros({std::max<int64_t>(longest, 1)}, at::kByte);
    if (!mine.empty()) std::memcpy(buf.data_ptr(), mine.data(), mine.size());
    std::vector<at::Tensor> bufs = gather(buf);
    std::vector<std::string> out;
    for (size_t r = 0; r < bufs.size(); ++r)
      out.emplace_back(static_cast<const char*>(bufs[r].data_ptr()), static_cast<size_t>(lens[r].item<int64_t>()));
    return out;
  }

  void barrier() override {
    c10d::BarrierOptions o;
    wait(guard("barrier", [&] { return pg_->barrier(o); }), "barrier");
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const {
    try {
      work->wait();
    } catch (const std::exception& e) {
      fail(what, e.what());
    }
  }

 private:
  template <class F>
  c10::intrusive_ptr<c10d::Work> guard(const char* what, F&& f) const {
    try {
      return f();
    } catch (const std::exception& e) {
      fail(what, e.what());
    }
  }

  [[noreturn]] void fail(const char* what, const std::string& why) const {
    std::string first = why.substr(0, why.find('\n'));
    throw DistributedError("rank " + std::to_string(env_.rank) + " of " + std::to_string(env_.world_size) + ": " + what +
                           " failed (another rank stopped, or did not answer within " +
                           std::to_string(timeout_.count() / 1000) + " s): " + first);
  }

  at::Tensor on_device(const at::Tensor& t) const { return t.device() == device_ ? t : t.to(device_); }

  std::vector<at::Tensor> gather(const at::Tensor& t) {
    payload_bytes_ += static_cast<int64_t>(t.numel() * t.element_size());
    std::vector<at::Tensor> in = {on_device(t)};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < env_.world_size; ++r) out[0].push_back(at::empty_like(in[0]));
    c10d::AllgatherOptions o;
    wait(guard("all-gather", [&] { return pg_->allgather(out, in, o); }), "all-gather");
    std::vector<at::Tensor> res;
    for (auto& x : out[0]) res.push_back(x.to(at::kCPU));
    return res;
  }

  DistEnv env_;
  std::string backend_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<Backend> pg_;
  at::Device device_;
  std::chrono::milliseconds timeout_;
};

// Gloo's transport on the interface that reaches MASTER_ADDR's kind of network: loopback for a
// single machine, GLOO_SOCKET_IFNAME when set (as in PyTorch), else this host's name.
std::shared_ptr<::gloo::transport::Device> gloo_device(const DistEnv& env) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  const std::string& a = env.master_addr;
  if (a == "localhost" || a.rfind("127.", 0) == 0 || a == "::1") return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

std::unique_ptr<Communicator> Communicator::create(const DistEnv& env, const std::string& backend, std::chrono::milliseconds timeout) {
  if (backend != "gloo" && backend != "nccl") throw ConfigError("distributed backend must be gloo or nccl, not '" + backend + "'");
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = static_cast<std::size_t>(env.world_size);
  so.waitWorkers = true;
  so.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    const std::string why = e.what();
    throw DistributedError(env.describe() + ": the rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port) +
                           " failed (" + why.substr(0, why.find('\n')) + ")" +
                           (env.rank == 0 ? "; is the port in use? set MASTER_PORT" : "; did every rank start?"));
  }
  if (backend == "nccl") {
#ifdef PREFIXCAP_WITH_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env.rank, env.world_size, opts);
    return std::make_unique<C10dCommunicator<c10d::ProcessGroupNCCL>>(env, backend, store, pg,
                                                                      at::Device(at::kCUDA, env.local_rank), timeout);
#else
    throw ConfigError("this prefixcap was built without NCCL (it needs a CUDA LibTorch with NCCL); use the gloo backend");
#endif
  }
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices.push_back(gloo_device(env));
  opts->threads = 2;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  try {
    pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, env.rank, env.world_size, opts);
  } catch (const std::exception& e) {
    const std::string why = e.what();
    throw DistributedError(env.describe() + ": Gloo could not connect the ranks (" + why.substr(0, why.find('\n')) + ")");
  }
  return std::make_unique<C10dCommunicator<c10d::ProcessGroupGloo>>(env, backend, store, pg, at::Device(at::kCPU), timeout);
}

// ---------------------------------------------------------------------------------------
// gradient synchronisation

struct GradientSync::Bucket {
  std::vector<size_t> params;
  std::vector<int64_t> offsets;
  at::Tensor flat;
  size_t ready = 0;
  bool launched = false;
  std::unique_ptr<Communicator::Pending> work;
};

struct GradientSync::Hook {
  // std::shared_ptr<Node> in LibTorch 1.13, c10::intrusive_ptr<Node> in 2.x
  decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>())) accumulator;
  uintptr_t key = 0;
};

GradientSync::GradientSync(Communicator& comm, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap)
    : comm_(comm), params_(std::move(params)), overlap_(overlap) {
  bucket_of_.assign(params_.size(), 0);
  // Reverse order: backward produces the last layers' gradients first.
  for (size_t k = params_.size(); k-- > 0;) {
    const at::Tensor& p = params_[k];
    if (!p.requires_grad()) throw std::logic_error("GradientSync: a parameter does not require gradients");
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    Bucket* b = buckets_.empty() ? nullptr : buckets_.back().get();
    const bool fits = b && b->flat.numel() * b->flat.element_size() + bytes <= bucket_bytes && b->flat.scalar_type() == p.scalar_type() &&
                      b->flat.device() == p.device();
    if (!fits) {
      buckets_.push_back(std::make_unique<Bucket>());
      b = buckets_.back().get();
      b->flat = at::empty({0}, p.options().requires_grad(false));
    }
    b->offsets.push_back(b->flat.numel());
    b->params.push_back(k);
    b->flat = at::empty({b->flat.numel() + p.numel()}, b->flat.options());
    bucket_of_[k] = buckets_.size() - 1;
  }
  if (overlap_) {
    hooks_.reserve(params_.size());
    for (size_t k = 0; k < params_.size(); ++k) {
      Hook h;
      h.accumulator = torch::autograd::impl::grad_accumulator(params_[k]);
      if (!h.accumulator) throw std::logic_error("GradientSync: a parameter has no gradient accumulator");
      h.key = h.accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [this, k](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
            ready(k);
            return outputs;
          }));
      hooks_.push_back(std::move(h));
    }
  }
}

GradientSync::~GradientSync() {
  for (auto& h : hooks_) h.accumulator->del_post_hook(h.key);
  for (auto& b : buckets_)
    if (b->work) try {
        b->work->wait();
      } catch (...) {  // the error was or will be reported by finish()
      }
}

size_t GradientSync::num_buckets() const { return buckets_.size(); }

int64_t GradientSync::bytes_per_step() const {
  int64_t n = 0;
  for (const auto& b : buckets_) n += b->flat.numel() * static_cast<int64_t>(b->flat.element_size());
  return n;
}

void GradientSync::prepare(bool last) {
  armed_ = last && overlap_;
  next_launch_ = 0;
  started_in_backward_ = 0;
  for (auto& b : buckets_) {
    b->ready = 0;
    b->launched = false;
  }
}

void GradientSync::ready(size_t param) {
  if (!armed_) return;
  Bucket& b = *buckets_[bucket_of_[param]];
  ++b.ready;
  while (next_launch_ < buckets_.size() && buckets_[next_launch_]->ready == buckets_[next_launch_]->params.size()) {
    launch(next_launch_++);
    ++started_in_backward_;
  }
}

void GradientSync::launch(size_t bucket) {
  Bucket& b = *buckets_[bucket];
  for (size_t j = 0; j < b.params.size(); ++j) {
    const at::Tensor& p = params_[b.params[j]];
    at::Tensor view = b.flat.narrow(0, b.offsets[j], p.numel());
    const at::Tensor& g = p.grad();
    if (g.defined()) view.copy_(g.reshape({-1}));
    else view.zero_();  // no gradient on this rank: it adds nothing to the others'
  }
  b.launched = true;
  b.work = comm_.allreduce_sum_async(b.flat);
}

void GradientSync::finish() {
  armed_ = false;
  for (; next_launch_ < buckets_.size(); ++next_launch_) launch(next_launch_);
  for (auto& bp : buckets_) {
    Bucket& b = *bp;
    auto work = std::move(b.work);
    work->wait();
    for (size_t j = 0; j < b.params.size(); ++j) {
      at::Tensor& p = params_[b.params[j]];
      at::Tensor view = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(view);
      else p.mutable_grad() = view.clone();
    }
  }
}

// ---------------------------------------------------------------------------------------
// local workers

int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    throw std::runtime_error(std::string("cannot find a free port: ") + std::strerror(errno));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

namespace {

volatile sig_atomic_t g_forward_signal = 0;
void remember_signal(int s) { g_forward_signal = s; }

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

int run_local_workers(const std::vector<std::string>& argv, int nproc, std::chrono::seconds grace) {
  if (nproc < 1) throw ConfigError("--nproc must be at least 1");
  if (argv.empty()) throw std::logic_error("run_local_workers: empty command");
  for (const char* v : {"RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK"})
    if (std::getenv(v)) throw ConfigError(std::string("--nproc starts its own workers; it cannot run under a launcher (") + v + " is set)");
  const char* addr_env = std::getenv("MASTER_ADDR");
  const std::string addr = addr_env && *addr_env ? addr_env : "127.0.0.1";
  const char* port_env = std::getenv("MASTER_PORT");
  const std::string port = port_env && *port_env ? port_env : std::to_string(free_local_port());
  std::string self = argv[0];
  {
    char buf[PATH_MAX];
    const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n > 0) self.assign(buf, static_cast<size_t>(n));
  }
  struct sigaction sa {};
  sa.sa_handler = remember_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_int {}, old_term {};
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  const pid_t parent = ::getpid();
  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the workers go when the launcher goes
      if (::getppid() != parent) _exit(1);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", addr.c_str(), 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(self.c_str(), args.data());
      std::fprintf(stderr, "cannot start %s: %s\n", self.c_str(), std::strerror(errno));
      _exit(127);
    }
    pids.push_back(pid);
  }
  int result = 0;
  size_t running = pids.size();
  std::optional<std::chrono::steady_clock::time_point> stopping;
  bool killed = false;
  auto signal_all = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) ::kill(p, sig);
  };
  while (running > 0) {
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      for (auto& p : pids)
        if (p == done) {
          p = -1;
          --running;
          const int code = exit_code(status);
          if (code != 0 && result == 0) {
            result = code;
            const size_t rank = static_cast<size_t>(&p - pids.data());
            std::fprintf(stderr, "caption-train: worker rank %zu %s; stopping the others\n", rank,
                         WIFSIGNALED(status) ? ("was killed by signal " + std::to_string(WTERMSIG(status))).c_str()
                                             : ("exited with status " + std::to_string(code)).c_str());
            signal_all(SIGTERM);
            stopping = std::chrono::steady_clock::now();
          }
        }
      continue;
    }
    if (g_forward_signal) {
      signal_all(g_forward_signal);
      g_forward_signal = 0;
      if (!stopping) stopping = std::chrono::steady_clock::now();
    }
    if (stopping && !killed && std::chrono::steady_clock::now() - *stopping > grace) {
      signal_all(SIGKILL);
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  return result;
}

}  // namespace prefixcap
