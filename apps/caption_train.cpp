// caption-train: trains a mapper (task caption) or a small GPT-2 (task lm).
//   caption-train [--config train.json] [--OPTION VALUE ...]
// Every option can be given in the JSON config under its name (with '_'); the command line
// wins over the file. --build-cache only fills the feature cache; --print-config shows the
// configuration that would run.
// Data parallelism: under torchrun, mpirun or srun every process is one rank (their variables
// say which, pipeline/distributed.h); --nproc N starts N local ranks itself.
// Exit code: 0 = done, 1 = usage, configuration or data error, 2 = training failed (also when
// another rank failed); with --nproc, the first failing worker's code.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "core/errors.h"
#include "core/threads.h"
#include "pipeline/distributed.h"
#include "pipeline/trainer.h"

using namespace prefixcap;

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  // A rank that dies closes its sockets; the others' next write to them must fail as an error
  // that names the rank (DistributedError), not kill the process with SIGPIPE (exit 141) before
  // it can say so. Python ignores SIGPIPE at start-up, which is why torchrun runs never see it.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"Train a prefix captioner's mapper (task caption) or a GPT-2-architecture language model (task lm).\n"
               "Options can also come from a JSON config (--config); the command line wins.",
               "caption-train"};
  app.get_formatter()->column_width(34);
  std::string config_path;
  bool build_only = false, print_config = false;
  app.add_option("--config", config_path, "JSON file with any of the options below (keys as written, with '_')")
      ->check(CLI::ExistingFile);
  app.add_flag("--build-cache", build_only, "only compute the frozen encoder's features into the cache, then stop");
  app.add_flag("--print-config", print_config, "print the resolved configuration as JSON and stop");
  int nproc = 0;
  app.add_option("--nproc", nproc, "start this many local worker processes (data parallel, Gloo on CPUs, NCCL on GPUs), as "
                                   "torchrun --nproc-per-node would")
      ->check(CLI::Range(1, 1024));

  TrainConfig defaults;
  auto options = train_options(defaults);
  std::map<std::string, std::string> given;  // option name -> command-line text
  std::map<std::string, CLI::Option*> cli;
  for (const auto& o : options) {
    std::string flag = "--" + o.name;
    for (auto& ch : flag)
      if (ch == '_') ch = '-';
    if (std::holds_alternative<bool*>(o.target)) {
      // A flag: bare = true, or --flag=false.
      cli[o.name] = app.add_flag(flag, given[o.name], o.help + " (default: " + train_option_value(o) + ")");
    } else {
      const char* type = std::holds_alternative<int64_t*>(o.target)  ? "INT"
                         : std::holds_alternative<double*>(o.target) ? "FLOAT"
                         : std::holds_alternative<Json*>(o.target)   ? "JSON|FILE"
                                                                     : "TEXT";
      cli[o.name] = app.add_option(flag, given[o.name], o.help)->default_str(train_option_value(o))->type_name(type);
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;  // --help: 0; usage errors: 1
  }

  TrainConfig config;
  try {
    if (!config_path.empty()) config = TrainConfig::from_json(read_json_file(config_path), config_path);
    for (const auto& o : options)
      if (cli[o.name]->count() > 0) set_train_option(config, o.name, given[o.name]);
    if (print_config) {
      std::cout << config.to_json().dump(2) << "\n";
      return 0;
    }
    config.validate();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption-train: %s\n", e.what());
    return 1;
  }
  if (nproc > 0) {
    // The workers are this command without --nproc.
    std::vector<std::string> args;
    for (int i = 0; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--nproc") {
        ++i;
        continue;
      }
      if (a.rfind("--nproc=", 0) == 0) continue;
      args.push_back(a);
    }
    try {
      return run_local_workers(args, nproc);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "caption-train: %s\n", e.what());
      return 1;
    }
  }

  try {
    // Ranks on one machine share its cores unless told otherwise.
    const DistEnv env = DistEnv::from_environment();
    int threads = static_cast<int>(config.num_threads);
    if (threads == 0 && env.local_world_size > 1) threads = env.threads_per_rank();
    configure_threads({threads, 0});
    if (build_only) {
      build_cache(config);
      return 0;
    }
    TrainHooks hooks;
    // Fault injection for the crash/resume tests: SIGKILL right after optimizer step N (its
    // log line written, a checkpoint due at that step not yet); with PREFIXCAP_FAULT_KILL_RANK,
    // only that rank dies.
    if (const char* kill_at = std::getenv("PREFIXCAP_FAULT_KILL_AT_STEP")) {
      const long long step = std::atoll(kill_at);
      const char* rank = std::getenv("PREFIXCAP_FAULT_KILL_RANK");
      if (!rank || std::atoi(rank) == env.rank)
        hooks.on_step = [step](int64_t s, double) {
          if (s == step) std::raise(SIGKILL);
        };
    }
    TrainResult r = train(config, hooks);
    if (env.rank == 0)  // one summary for the whole run
      std::fprintf(stderr, "caption-train: %lld steps, last loss %.4f; output %s%s\n", static_cast<long long>(r.steps), r.last_loss,
                 r.bundle.c_str(), r.best.empty() ? "" : ("; best " + r.best_metrics.dump() + " in " + r.best).c_str());
    return 0;
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "caption-train: %s\n", e.what());
    return 1;
  } catch (const FileError& e) {
    std::fprintf(stderr, "caption-train: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption-train: training failed: %s\n", e.what());
    return 2;
  }
}
